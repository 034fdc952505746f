"""The HTML evaluation report without a browser: self-contained, every plot present, every data
string escaped, empty or malformed sections explained instead of crashing, atomic writes."""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import pytest

from stillhouse.eval import report as report_module
from stillhouse.eval.report import (
    ABEffect,
    ArmRow,
    DivergencePoint,
    FallbackPoint,
    ReportData,
    render_report,
    write_report,
)

PLOTS = ["judge-scores", "divergence", "ab-effect", "fallback-curve"]
EVIL = "<script>alert('x')</script>"
BASE = {"title": "weekly evaluation", "generated_at": "2025-06-02T06:00:00Z", "window": "w22"}


def full_data(name: str = "challenger", **overrides) -> ReportData:
    fields = dict(
        BASE,
        arms=[
            ArmRow("champion", 400, "champion", 4.1, 4.0, 4.2, None, 0.12, 0.004, 0.08, 0.35),
            ArmRow(name, 300, "challenger", 4.25, 4.1, 4.4, 0.46, 0.09),
        ],
        judge_scores={"champion": [5, 4, 4, 3, 5, 2], name: [5, 5, 4, 4, 1]},
        divergence={
            name: [
                DivergencePoint(f"2025-05-{26 + i}T00:00:00Z", 0.1 + 0.01 * i, 0.08, 0.2)
                for i in range(5)
            ]
        },
        drift_threshold=0.15,
        drift_state="stable",
        change_points=["2025-05-28T00:00:00Z"],
        ab_effects=[ABEffect(f"judge score ({name})", 0.15, 0.02, 0.28, "better")],
        fallback_curve=[FallbackPoint(t / 4, 1 - t / 4, 4.0 + 0.1 * t) for t in range(5)],
        fallback_threshold=0.6,
        extra_tables={f"slices {name}": [{"slice": name, "accuracy": 0.81}]},
        notes=[f"note about {name}"],
    )
    fields.update(overrides)
    return ReportData(**fields)


@pytest.fixture(scope="module")
def page() -> str:
    return render_report(full_data())


def figures(html: str) -> dict[str, str]:
    found = re.findall(
        r'<figure class="plot" id="plot-([^"]+)" data-plot="\1">(.*?)</figure>', html
    )
    return dict(found)


def test_the_page_references_nothing_outside_itself(page):
    assert "http://" not in page and "https://" not in page
    refs = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith("data:") for r in refs), refs
    assert "<script" not in page.lower()  # no JavaScript at all
    # The CSP makes a browser refuse anything else (see tests/integration/test_report_chromium.py).
    assert "default-src &#x27;none&#x27;; img-src data:" in page


def test_every_plot_is_a_captioned_figure_with_an_embedded_png(page):
    found = figures(page)
    assert list(found) == PLOTS
    for plot_id, body in found.items():
        caption = re.search(r"<figcaption>(.+)</figcaption>", body)
        assert caption and "?" in caption.group(1), plot_id  # says what the plot answers
        img = re.fullmatch(
            r'<img src="data:image/png;base64,([^"]+)" width="(\d+)" '
            r'height="(\d+)" alt="[^"]+">.*',
            body,
        )
        assert img, plot_id
        png = base64.b64decode(img.group(1), validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert int(img.group(2)) > 0 and int(img.group(3)) > 0
    assert 'class="no-data"' not in page and 'class="plot-error"' not in page


def test_the_summary_table_shows_set_columns_and_drops_unset_ones(page):
    table = re.search(r'<table data-table="arms">(.*?)</table>', page).group(1)
    headers = re.findall(r"<th>(.*?)</th>", table)
    assert headers == [
        "arm",
        "role",
        "n",
        "judge mean [95% CI]",
        "pairwise win rate",
        "fallback rate",
        "error rate",
        "latency p50",
        "latency p99",
    ]  # no arm has a cost: no cost column
    assert "<td>4.10 [4.00, 4.20]</td>" in table
    assert "<td>12.0 %</td>" in table and "<td>80 ms</td>" in table
    assert "<td>–</td>" in table  # the champion has no pairwise win rate


def test_every_data_string_is_escaped():
    data = full_data(
        name=EVIL,
        title=EVIL,
        window=EVIL,
        drift_state=EVIL,
        divergence_metric=EVIL,
        quality_label=EVIL,
        missing={"notes": EVIL},
    )
    html = render_report(data)
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert list(figures(html)) == PLOTS  # and the plots still draw with it in their labels


def test_dollar_signs_are_plain_text_in_plots_not_mathtext():
    html = render_report(full_data(name=r"arm $\bogus{x}$ costs $3 & $5"))
    assert list(figures(html)) == PLOTS


def test_an_empty_report_explains_each_missing_section():
    html = render_report(ReportData(**BASE, missing={"ab-effect": "only one arm is serving"}))
    assert figures(html) == {}
    notes = dict(
        re.findall(r'<p class="no-data" data-missing="([^"]+)">no data: ([^<]+)</p>', html)
    )
    assert set(notes) == {"arms", *PLOTS}
    assert notes["ab-effect"] == "only one arm is serving"
    assert notes["judge-scores"] == "no judge scores in this window"
    assert 'drift state: <span class="state">unknown</span>' in html


def test_empty_series_and_tables_count_as_missing():
    html = render_report(
        ReportData(
            **BASE,
            judge_scores={"champion": []},
            divergence={"overall": []},
            extra_tables={"slices": []},
        )
    )
    assert figures(html) == {}
    assert 'data-missing="judge-scores"' in html and 'data-missing="divergence"' in html
    assert 'data-missing="table:slices">no data: the table is empty' in html


@pytest.mark.parametrize(
    ("overrides", "plot_id", "reason"),
    [
        ({"judge_scores": {"a": [1, 7]}}, "judge-scores", "outside 1-5"),
        ({"divergence": {"a": [("2025-13-01", 0.1, None, None)]}}, "divergence", "ISO-8601"),
        (
            {"divergence": {"a": [("2025-05-01", 0.1, None, None), (3, 0.2, None, None)]}},
            "divergence",
            "all ISO-8601 strings or all numbers",
        ),
        ({"ab_effects": [ABEffect("judge", 0.5, 0.0, 0.2, "better")]}, "ab-effect", "outside"),
        ({"fallback_curve": [FallbackPoint(0.5, 1.5, 4.0)]}, "fallback-curve", "outside [0, 1]"),
    ],
)
def test_malformed_data_costs_one_plot_with_a_reason(overrides, plot_id, reason):
    html = render_report(ReportData(**BASE, **overrides))
    error = re.search(
        rf'<p class="plot-error" data-missing="{plot_id}">plot not drawn: (.*?)</p>', html
    )
    assert error and reason in error.group(1), html[-600:]
    assert figures(html) == {}


def test_plain_tuples_work_in_place_of_the_row_classes():
    data = ReportData(
        **BASE,
        divergence={"overall": [(0, 0.1, 0.05, 0.15), (1, 0.12, None, None)]},  # window index
        ab_effects=[("pairwise", -0.1, -0.2, 0.0, "worse")],
        fallback_curve=[(0.2, 0.9, 0.8), (0.8, 0.4, 0.9)],
        fallback_threshold=0.5,
        quality_label="accuracy",
    )
    assert list(figures(render_report(data))) == ["divergence", "ab-effect", "fallback-curve"]


def test_rendering_is_deterministic(page):
    assert render_report(full_data()) == page


def test_write_report_writes_the_page_with_readable_permissions(tmp_path, page):
    path = write_report(full_data(), tmp_path / "out" / "report.html")
    assert path == tmp_path / "out" / "report.html"
    assert path.read_text(encoding="utf-8") == page
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["report.html"]  # no temporary file left behind


def test_write_report_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("previous report", encoding="utf-8")

    def failing_replace(src, dst):
        assert Path(src).parent == path.parent  # same folder: the rename is atomic
        assert Path(src).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
        raise OSError("disk full")

    monkeypatch.setattr(report_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(ReportData(**BASE), path)
    assert path.read_text(encoding="utf-8") == "previous report"
    assert os.listdir(tmp_path) == ["report.html"]
