"""A self-contained HTML evaluation report: per-arm summary, judge scores, divergence and drift,
the A/B effect, and the fallback trade-off, as one page with its plots embedded.

    from stillhouse.eval.report import ArmRow, ReportData, write_report
    data = ReportData(title="weekly evaluation", generated_at="2025-06-02T06:00:00Z",
                      window="2025-05-26 .. 2025-06-02", arms=[ArmRow(arm="champion", n=1200)])
    write_report(data, Path("report.html"))     # open it in any browser, offline

The renderer is a pure function of plain data (`render_report`); the caller computes the
statistics. The page loads nothing: plots are PNG data URIs, styles inline, no script, and a
Content-Security-Policy that forbids any other source, so a stray reference fails loudly in a
browser instead of leaking a request. A section without data says so ("no data: <why>").
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from stillhouse.common.formatting import number, percent
from stillhouse.eval import report_plots

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem auto; max-width: 60rem;
       padding: 0 1rem; color: #1b1b1b; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: .5rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f4f4f4; }
figure.plot { margin: .5rem 0; } figure.plot img { max-width: 100%; height: auto; }
figcaption { color: #444; font-size: 13px; }
.no-data, .plot-error { color: #777; font-style: italic; }
.plot-error { color: #b71c1c; }
.state { font-weight: 600; }
"""


@dataclass(frozen=True)
class ArmRow:
    """One arm's summary line. Rates are fractions in [0, 1]; a None cell prints as "–" and a
    column that is None for every arm is left out."""

    arm: str
    n: int
    role: str = ""  # champion / challenger / teacher
    judge_mean: float | None = None
    judge_low: float | None = None
    judge_high: float | None = None
    pairwise_win_rate: float | None = None
    fallback_rate: float | None = None
    error_rate: float | None = None
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    cost_per_request: float | None = None


@dataclass(frozen=True)
class DivergencePoint:
    """One window of the divergence series; ts is an ISO-8601 string or a number (window index)."""

    ts: str | float
    mean: float
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class ABEffect:
    """One compared metric: challenger − champion with its interval and the test's verdict."""

    label: str
    diff: float
    low: float
    high: float
    verdict: str  # "better" / "worse" / "inconclusive" (colour keys on better/worse)


@dataclass(frozen=True)
class FallbackPoint:
    """At this confidence threshold: the share the student serves and the quality served."""

    threshold: float
    student_share: float
    quality: float


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows. Sequences may hold the dataclasses above or plain tuples in
    their field order. `missing` maps a section id (arms, judge-scores, divergence, ab-effect,
    fallback-curve, tables, notes) to the reason it is empty, shown instead of a generic one."""

    title: str
    generated_at: str  # ISO 8601
    window: str
    arms: Sequence[ArmRow] = field(default_factory=list)
    judge_scores: Mapping[str, Sequence[int]] = field(default_factory=dict)  # arm -> 1..5 scores
    divergence: Mapping[str, Sequence[DivergencePoint]] = field(default_factory=dict)  # series
    divergence_metric: str = "divergence"
    drift_threshold: float | None = None
    drift_state: str = "unknown"
    change_points: Sequence[str | float] = field(default_factory=list)
    ab_effects: Sequence[ABEffect] = field(default_factory=list)
    fallback_curve: Sequence[FallbackPoint] = field(default_factory=list)
    fallback_threshold: float | None = None  # the configured confidence threshold
    quality_label: str = "judge score"
    ci_level: float = 0.95
    cost_unit: str = ""
    extra_tables: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    notes: Sequence[str] = field(default_factory=list)
    missing: Mapping[str, str] = field(default_factory=dict)


# What each plot answers: the figcaption, and the alt text of its image.
QUESTIONS = {
    "judge-scores": "How does the LLM judge score each arm? Bars are each arm's share of "
    "scores 1–5; the legend gives n, the mean and its confidence interval.",
    "divergence": "Is the student drifting away from the teacher? Mean divergence per window "
    "with its confidence band; the dashed line is the drift threshold.",
    "ab-effect": "Is the challenger better than the champion? Each row is challenger − "
    "champion with its confidence interval; an interval that crosses zero is inconclusive.",
    "fallback-curve": "What does the confidence threshold trade? A higher threshold sends more "
    "requests to the teacher (the student share falls) and changes the quality served; the "
    "dashed line is the configured threshold.",
}

DEFAULT_MISSING = {
    "arms": "no per-arm summary was given",
    "judge-scores": "no judge scores in this window",
    "divergence": "no shadow divergence measurements in this window",
    "ab-effect": "no A/B comparison (is a challenger serving?)",
    "fallback-curve": "no confidence-threshold sweep was given",
    "tables": "",
    "notes": "",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _plain(item: Any) -> tuple[Any, ...]:
    """A dataclass row or a tuple, as a tuple in field order."""
    return astuple(item) if is_dataclass(item) and not isinstance(item, type) else tuple(item)


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _secs(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{1000 * value:.0f} ms" if value < 1 else f"{value:.2f} s"


def _judge(row: ArmRow) -> str:
    if row.judge_mean is None:
        return "–"
    if row.judge_low is None or row.judge_high is None:
        return f"{row.judge_mean:.2f}"
    return f"{row.judge_mean:.2f} [{row.judge_low:.2f}, {row.judge_high:.2f}]"


def _no_data(section: str, data: ReportData) -> str:
    why = data.missing.get(section) or DEFAULT_MISSING.get(section) or "nothing to show"
    return f'<p class="no-data" data-missing="{_e(section)}">no data: {_e(why)}</p>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], name: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return (
        f'<table data-table="{_e(name)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def _arms_table(data: ReportData) -> str:
    if not data.arms:
        return _no_data("arms", data)
    level = f"{data.ci_level:.0%}"
    cost = f"cost / request ({data.cost_unit})" if data.cost_unit else "cost / request"
    columns: list[tuple[str, str, Callable[[ArmRow], str]]] = [
        ("arm", "arm", lambda r: r.arm),
        ("role", "role", lambda r: r.role or "–"),
        ("n", "n", lambda r: str(r.n)),
        ("judge_mean", f"judge mean [{level} CI]", _judge),
        (
            "pairwise_win_rate",
            "pairwise win rate",
            lambda r: percent(r.pairwise_win_rate, spaced=True),
        ),
        ("fallback_rate", "fallback rate", lambda r: percent(r.fallback_rate, spaced=True)),
        ("error_rate", "error rate", lambda r: percent(r.error_rate, spaced=True)),
        ("latency_p50_s", "latency p50", lambda r: _secs(r.latency_p50_s)),
        ("latency_p99_s", "latency p99", lambda r: _secs(r.latency_p99_s)),
        ("cost_per_request", cost, lambda r: number(r.cost_per_request, ".4g")),
    ]
    always = {"arm", "n"}
    kept = [
        c
        for c in columns
        if c[0] in always or any(getattr(r, c[0]) not in (None, "") for r in data.arms)
    ]
    rows = [[render(r) for _, _, render in kept] for r in data.arms]
    return _table([h for _, h, _ in kept], rows, "arms")


def _figure(plot_id: str, draw: Callable[[], bytes]) -> str:
    try:
        png = draw()
    except ValueError as exc:
        # Malformed data costs one plot, not the report.
        return f'<p class="plot-error" data-missing="{_e(plot_id)}">plot not drawn: {_e(exc)}</p>'
    width, height = report_plots.png_size(png)
    scale = 96 / report_plots.DPI  # CSS pixels: the PNG is drawn at DPI for sharp text
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    question = QUESTIONS[plot_id]
    return (
        f'<figure class="plot" id="plot-{_e(plot_id)}" data-plot="{_e(plot_id)}">'
        f'<img src="{src}" width="{round(width * scale)}" height="{round(height * scale)}" '
        f'alt="{_e(question)}"><figcaption>{_e(question)}</figcaption></figure>'
    )


def _judge_section(data: ReportData) -> str:
    scores = {str(a): list(s) for a, s in data.judge_scores.items()}
    if not any(scores.values()):
        return _no_data("judge-scores", data)
    summaries = {r.arm: (r.judge_mean, r.judge_low, r.judge_high) for r in data.arms}
    return _figure(
        "judge-scores",
        lambda: report_plots.judge_scores_png(scores, summaries, data.ci_level),
    )


def _divergence_section(data: ReportData) -> str:
    series = {str(k): [_plain(p) for p in v] for k, v in data.divergence.items()}
    state = f'<p>drift state: <span class="state">{_e(data.drift_state)}</span>'
    if data.drift_threshold is not None:
        state += f" (threshold {_e(number(float(data.drift_threshold), '.4g'))})"
    state += "</p>"
    if not any(series.values()):
        return state + _no_data("divergence", data)
    return state + _figure(
        "divergence",
        lambda: report_plots.divergence_png(
            series,
            data.drift_threshold,
            data.drift_state,
            list(data.change_points),
            data.divergence_metric,
            data.ci_level,
        ),
    )


def _ab_section(data: ReportData) -> str:
    effects = [_plain(e) for e in data.ab_effects]
    if not effects:
        return _no_data("ab-effect", data)
    level = f"{data.ci_level:.0%}"
    rows = [
        [str(label), f"{diff:+.4g}", f"[{low:+.4g}, {high:+.4g}]", str(verdict)]
        for label, diff, low, high, verdict in effects
    ]
    figure = _figure("ab-effect", lambda: report_plots.ab_effect_png(effects, data.ci_level))
    return figure + _table(
        ["metric", "challenger − champion", f"{level} CI", "verdict"], rows, "ab-effect"
    )


def _fallback_section(data: ReportData) -> str:
    points = [_plain(p) for p in data.fallback_curve]
    if not points:
        return _no_data("fallback-curve", data)
    return _figure(
        "fallback-curve",
        lambda: report_plots.fallback_curve_png(
            points, data.fallback_threshold, data.quality_label
        ),
    )


def _extra_tables(data: ReportData) -> str:
    parts = []
    for name, rows in data.extra_tables.items():
        parts.append(f"<h3>{_e(name)}</h3>")
        if not rows:
            parts.append(
                f'<p class="no-data" data-missing="table:{_e(name)}">'
                "no data: the table is empty</p>"
            )
            continue
        headers: list[str] = []
        for row in rows:
            headers += [str(k) for k in row if str(k) not in headers]
        cells = [
            [number({str(k): v for k, v in r.items()}.get(h), ".4g") for h in headers] for r in rows
        ]
        parts.append(_table(headers, cells, f"extra:{name}"))
    return "".join(parts)


def render_report(data: ReportData) -> str:
    """The whole page as one string; the same data gives the same page, byte for byte."""
    sections = [
        ("arms", "Arms", _arms_table(data)),
        ("judge-scores", "Judge scores", _judge_section(data)),
        ("divergence", "Divergence and drift", _divergence_section(data)),
        ("ab-effect", "A/B effect", _ab_section(data)),
        ("fallback-curve", "Confidence fallback", _fallback_section(data)),
    ]
    if data.extra_tables:
        sections.append(("tables", "Tables", _extra_tables(data)))
    if data.notes:
        notes = "".join(f"<li>{_e(n)}</li>" for n in data.notes)
        sections.append(("notes", "Notes", f"<ul>{notes}</ul>"))
    body = "".join(
        f'<section id="{sid}" data-section="{sid}"><h2>{_e(h)}</h2>{content}</section>'
        for sid, h, content in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An empty icon, so no browser goes looking for /favicon.ico next to the file.
        '<link rel="icon" href="data:,">'
        f"<title>{_e(data.title)}</title><style>{STYLE}</style></head>\n"
        f"<body><header><h1>{_e(data.title)}</h1>"
        f'<p class="meta">generated <time>{_e(data.generated_at)}</time> · '
        f"window {_e(data.window)}</p></header>\n<main>{body}</main></body></html>\n"
    )


def write_report(data: ReportData, path: Path | str) -> Path:
    """Render and write the page atomically: a reader sees the old file or the new one, never
    half of one (temporary file in the same folder, fsync, then rename over the target)."""
    path = Path(path)
    page = render_report(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the report from a web server
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
