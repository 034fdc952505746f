"""The evaluation report in a real browser (headless Chromium over the DevTools protocol): it
opens, every plot is drawn and visible, and the page logs no error. The broken-page tests prove
the checks can fail: a corrupt plot image, a missing plot, a throwing script, a failed load and an
external reference (blocked by the page's CSP) are each reported.

    .venv/bin/pytest tests/integration/test_report_chromium.py

Needs Debian's `chromium` package; `make test` installs it. Without it these tests fail (not skip).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stillhouse.eval.report import (
    ABEffect,
    ArmRow,
    DivergencePoint,
    FallbackPoint,
    ReportData,
    render_report,
    write_report,
)

pytestmark = pytest.mark.slow


def _load_driver() -> Any:
    # tests/integration is not on the import path (pyproject adds only tests/unit).
    name = "stillhouse_tests_chromium"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("chromium.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


chromium = _load_driver()

PLOTS = ["judge-scores", "divergence", "ab-effect", "fallback-curve"]

# Per figure.plot: its id, caption, the rendered size of its image (or inline svg), and for an
# <img> whether it decoded (complete && naturalWidth > 0: a broken image keeps its box size).
PLOT_CHECK_JS = """
[...document.querySelectorAll('figure.plot')].map((fig) => {
  const media = fig.querySelector('img, svg');
  const box = media ? media.getBoundingClientRect() : {width: 0, height: 0};
  const isImg = media !== null && media.tagName === 'IMG';
  return {
    plot: fig.dataset.plot || '',
    caption: (fig.querySelector('figcaption') || {textContent: ''}).textContent.trim(),
    kind: media ? media.tagName.toLowerCase() : null,
    width: box.width,
    height: box.height,
    decoded: isImg ? (media.complete && media.naturalWidth > 0) : media !== null,
  };
})
"""


def report_problems(page: Any, expected: list[str]) -> list[str]:
    """Everything wrong with an opened report page, one line each; [] for a good page."""
    problems = list(page.errors)
    plots = page.value or []
    found = [p["plot"] for p in plots]
    problems += [f"plot {name}: missing" for name in expected if name not in found]
    for p in plots:
        if p["kind"] is None:
            problems.append(f"plot {p['plot']}: no <img> or <svg>")
            continue
        if not p["decoded"]:
            problems.append(f"plot {p['plot']}: image did not load")
        if p["width"] <= 0 or p["height"] <= 0:
            problems.append(f"plot {p['plot']}: zero-size box {p['width']}x{p['height']}")
        if not p["caption"]:
            problems.append(f"plot {p['plot']}: no caption")
    return problems


@contextlib.contextmanager
def browser(group_processes) -> Iterator[Any]:
    """A started Chromium; stopped at the end, and nothing of its process group may survive."""
    b = chromium.Chromium()
    missing = None
    try:
        b.start()
    except chromium.ChromiumMissing as exc:
        missing = str(exc)
    if missing:  # a failure, not a skip: `make test` installs chromium
        pytest.fail(missing, pytrace=False)
    pgid = b.pgid
    try:
        yield b
    finally:
        b.stop()
    assert group_processes(pgid) == [], "chromium processes survived stop()"


def sample_data() -> ReportData:
    def scores(counts: list[int]) -> list[int]:
        return [s for s, c in zip(range(1, 6), counts, strict=True) for _ in range(c)]

    return ReportData(
        title="weekly evaluation <script>alert('x')</script>",
        generated_at="2025-06-02T06:00:00Z",
        window="2025-05-26 .. 2025-06-02",
        arms=[
            ArmRow("champion", 400, "champion", 4.1, 4.0, 4.2, None, 0.12, 0.004, 0.08, 0.35),
            ArmRow("<b>challenger</b>", 300, "challenger", 4.25, 4.1, 4.4, 0.46, 0.09),
        ],
        judge_scores={
            "champion": scores([8, 20, 52, 160, 160]),
            "<b>challenger</b>": scores([5, 15, 40, 110, 130]),
        },
        divergence={
            "overall": [
                DivergencePoint(
                    f"2025-05-{26 + i // 2:02d}T{12 * (i % 2):02d}:00:00Z",
                    0.05 + 0.01 * i,
                    0.04 + 0.01 * i,
                    0.06 + 0.01 * i,
                )
                for i in range(12)
            ]
        },
        drift_threshold=0.15,
        drift_state="drifting",
        change_points=["2025-05-29T00:00:00Z"],
        ab_effects=[
            ABEffect("judge score", 0.15, 0.02, 0.28, "better"),
            ABEffect("pairwise vs champion", 0.03, -0.02, 0.08, "inconclusive"),
        ],
        fallback_curve=[
            FallbackPoint(t / 10, 1 - (t / 10) ** 2, 3.9 + 0.04 * t) for t in range(11)
        ],
        fallback_threshold=0.6,
        extra_tables={"slices": [{"slice": "hard", "accuracy": 0.81}]},
        notes=["shadow sample: 5 % of requests"],
    )


def test_report_opens_with_every_plot_drawn_and_no_console_error(tmp_path, group_processes):
    path = write_report(sample_data(), tmp_path / "report.html")
    with browser(group_processes) as b:
        page = b.open(path, check_js=PLOT_CHECK_JS)
        title = b.open(path, check_js="document.title").value
    assert report_problems(page, PLOTS) == []
    assert [p["plot"] for p in page.value] == PLOTS
    assert all(p["kind"] == "img" for p in page.value)
    assert title == "weekly evaluation <script>alert('x')</script>"  # shown as text, not run


def test_a_broken_or_missing_plot_is_reported(tmp_path, group_processes):
    page = render_report(sample_data())
    # The first plot's image becomes undecodable bytes; the last figure goes away entirely.
    page = re.sub(r"data:image/png;base64,[^\"]+", "data:image/png;base64,AAAA", page, count=1)
    page = re.sub(r'<figure class="plot" id="plot-fallback-curve".*?</figure>', "", page)
    path = tmp_path / "broken.html"
    path.write_text(page, encoding="utf-8")
    with browser(group_processes) as b:
        result = b.open(path, check_js=PLOT_CHECK_JS)
    assert report_problems(result, PLOTS) == [
        "plot fallback-curve: missing",
        "plot judge-scores: image did not load",
    ]


def test_script_errors_console_errors_failed_loads_and_external_references_are_reported(
    tmp_path, group_processes
):
    (tmp_path / "errors.html").write_text(
        "<!DOCTYPE html><html><body><img src='no-such-plot.png'>"
        "<script>console.error('plot data missing'); throw new Error('boom');</script>"
        "</body></html>",
        encoding="utf-8",
    )
    # The report's own CSP turns any external reference into a logged, blocked load.
    external = render_report(sample_data()).replace(
        "<main>", '<main><img src="https://example.invalid/plot.png">', 1
    )
    (tmp_path / "external.html").write_text(external, encoding="utf-8")
    with browser(group_processes) as b:
        errors = b.open(tmp_path / "errors.html").errors
        blocked = b.open(tmp_path / "external.html", check_js=PLOT_CHECK_JS)
    assert any("ERR_FILE_NOT_FOUND" in e and "no-such-plot.png" in e for e in errors), errors
    assert any(e.startswith("console.error: plot data missing") for e in errors), errors
    assert any(e.startswith("uncaught exception: Error: boom") for e in errors), errors
    assert len(errors) == 3, errors
    assert any("Content Security Policy" in e and "example.invalid" in e for e in blocked.errors)
    assert report_problems(blocked, PLOTS) == blocked.errors  # the plots themselves are fine


def test_the_report_of_the_evaluation_pipeline_opens_with_every_plot(tmp_path, group_processes):
    # The page `stillhouse report` writes, from a synthetic traffic log judged by a fake judge:
    # what a user opens, not a hand-made ReportData.
    from eval_world import eval_settings, write_traffic
    from fake_judge import FakeJudge, serve
    from fake_vllm import LoopThread
    from rich.console import Console

    from stillhouse.cli import evaluation

    loop = LoopThread()
    try:
        settings = eval_settings(tmp_path / "state", serve(loop, FakeJudge()))
        write_traffic(settings.traffic_log_path)
        evaluation.run_judge(settings, Console(quiet=True))
        path = evaluation.run_report(settings, Console(quiet=True), out=tmp_path / "report.html")
    finally:
        loop.close()
    with browser(group_processes) as b:
        page = b.open(path, check_js=PLOT_CHECK_JS)
    assert report_problems(page, PLOTS) == []
    assert "no data" not in path.read_text()
