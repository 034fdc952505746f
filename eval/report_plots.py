"""The evaluation report's plots: plain data in, PNG bytes out.

Each function draws on its own `matplotlib.figure.Figure` with an Agg canvas (never pyplot and
its global state, so this is safe in a server thread) and raises `ValueError` with a one-line
reason when the data cannot be drawn; `stillhouse.eval.report` turns that into a note.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 150
SCORES = (1, 2, 3, 4, 5)
VERDICT_COLOURS = {"better": "#2e7d32", "worse": "#c62828"}
NEUTRAL = "#616161"


def mpl_text(s: str) -> str:
    """Data strings reach matplotlib as literal text: a `$` would otherwise start mathtext."""
    return str(s).replace("$", r"\$")


def png_size(png: bytes) -> tuple[int, int]:
    """Pixel width and height from the PNG header (the IHDR chunk always comes first)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No Software/date metadata: the same data gives the same bytes.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _ci_text(mean: float | None, low: float | None, high: float | None, level: float) -> str:
    if mean is None:
        return ""
    if low is None or high is None:
        return f"mean {mean:.2f}"
    return f"mean {mean:.2f}, {level:.0%} CI [{low:.2f}, {high:.2f}]"


def judge_scores_png(
    scores: Mapping[str, Sequence[int]],
    summaries: Mapping[str, tuple[float | None, float | None, float | None]],
    ci_level: float,
) -> bytes:
    """Grouped bars: each arm's share of judge scores 1..5; the legend gives n, mean and CI.

    `summaries[arm]` is (mean, low, high) from the caller's statistics; an arm without one gets
    the plain mean of its scores and no interval (the renderer does no inference itself)."""
    arms = [a for a, s in scores.items() if len(s) > 0]
    if not arms:
        raise ValueError("no arm has judge scores")
    for arm in arms:
        bad = sorted({int(s) for s in scores[arm] if int(s) not in SCORES})
        if bad:
            raise ValueError(f"judge scores outside 1-5 for arm {arm!r}: {bad}")
    fig = _new_figure(7.5, 3.4 + 0.2 * len(arms))
    ax = fig.add_subplot()
    x = np.arange(len(SCORES))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        values = [int(s) for s in scores[arm]]
        shares = [values.count(k) / len(values) for k in SCORES]
        mean, low, high = summaries.get(arm, (None, None, None))
        if mean is None:
            mean, low, high = float(np.mean(values)), None, None
        label = f"{arm} (n={len(values)}, {_ci_text(mean, low, high, ci_level)})"
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, shares, width, label=mpl_text(label))
    ax.set_xticks(x, [str(k) for k in SCORES])
    ax.set_xlabel("judge score")
    ax.set_ylabel("share of judged requests")
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    ax.set_title("judge score distribution per arm")
    ax.grid(axis="y", alpha=0.3)
    # Below the axes, so no bar hides behind it whatever the distribution.
    fig.legend(fontsize=8, loc="outside lower center", ncols=1)
    return _png(fig)


def _timestamps(values: Sequence[Any]) -> list[Any]:
    """ISO-8601 strings become naive UTC datetimes; numbers (e.g. window indices) stay numbers."""
    if all(isinstance(v, str) for v in values):
        out = []
        for v in values:
            try:
                ts = datetime.fromisoformat(v)
            except ValueError:
                raise ValueError(f"timestamp {v!r} is not a valid ISO-8601 time") from None
            out.append(ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts)
        return out
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values]
    raise ValueError("timestamps must be all ISO-8601 strings or all numbers")


def divergence_png(
    series: Mapping[str, Sequence[tuple[Any, float, float | None, float | None]]],
    threshold: float | None,
    state: str,
    change_points: Sequence[Any],
    metric: str,
    ci_level: float,
) -> bytes:
    """Mean divergence over time per series with its CI band, the drift threshold as a
    horizontal line, change points as vertical lines and the drift state in the title."""
    named = {name: list(points) for name, points in series.items() if points}
    if not named:
        raise ValueError("no divergence points")
    all_ts = [p[0] for pts in named.values() for p in pts] + list(change_points)
    # One kind of timestamp across series and change points, or a reason why not.
    is_time = isinstance(_timestamps(all_ts)[0], datetime)
    fig = _new_figure(7.5, 3.6)
    ax = fig.add_subplot()
    for name, points in named.items():
        stamped = zip(_timestamps([p[0] for p in points]), points, strict=True)
        pairs = sorted(stamped, key=lambda pair: pair[0])
        ts = [t for t, _ in pairs]
        points = [p for _, p in pairs]
        means = [float(p[1]) for p in points]
        (line,) = ax.plot(ts, means, marker="o", markersize=3, label=mpl_text(name))
        banded = [(t, p[2], p[3]) for t, p in zip(ts, points, strict=True) if None not in p[2:4]]
        if banded:
            ax.fill_between(
                [b[0] for b in banded],
                [float(b[1]) for b in banded],
                [float(b[2]) for b in banded],
                color=line.get_color(),
                alpha=0.2,
                label=mpl_text(f"{name} {ci_level:.0%} CI"),
            )
    if threshold is not None:
        label = f"drift threshold {threshold:g}"
        ax.axhline(threshold, color="#c62828", linestyle="--", label=label)
    for i, cp in enumerate(_timestamps(list(change_points)) if change_points else []):
        ax.axvline(cp, color=NEUTRAL, linestyle=":", label="change point" if i == 0 else None)
    if is_time:
        fig.autofmt_xdate()
    ax.set_xlabel("time" if is_time else "window")
    ax.set_ylabel(mpl_text(metric))
    ax.set_title(mpl_text(f"{metric} over time — drift state: {state}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def verdict_colour(verdict: str) -> str:
    v = verdict.lower()
    for word, colour in VERDICT_COLOURS.items():
        if word in v:
            return colour
    return NEUTRAL


def ab_effect_png(
    effects: Sequence[tuple[str, float, float, float, str]], ci_level: float
) -> bytes:
    """A forest plot, one row per compared metric: the difference with its interval and a zero
    line. Each row has its own x scale, because the metrics do not share units."""
    rows = list(effects)
    if not rows:
        raise ValueError("no A/B comparisons")
    for label, diff, low, high, _ in rows:
        if not low <= diff <= high:
            raise ValueError(f"A/B row {label!r}: difference {diff} is outside [{low}, {high}]")
    fig = _new_figure(7.5, 0.5 + 1.0 * len(rows))
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (label, diff, low, high, verdict) in zip(axes, rows, strict=True):
        colour = verdict_colour(verdict)
        ax.errorbar(
            [diff],
            [0],
            xerr=[[diff - low], [high - diff]],
            fmt="o",
            color=colour,
            capsize=5,
            markersize=6,
        )
        ax.axvline(0, color="black", linewidth=0.8)
        span = max(abs(low), abs(high), 1e-9) * 1.15
        ax.set_xlim(min(low, 0) - 0.15 * span, max(high, 0) + 0.15 * span)
        ax.set_yticks([])
        ax.set_title(
            mpl_text(f"{label}: {diff:+.3g} [{low:+.3g}, {high:+.3g}] — {verdict}"),
            loc="left",
            fontsize=9,
            color=colour,
        )
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel(f"challenger − champion ({ci_level:.0%} CI)")
    return _png(fig)


def fallback_curve_png(
    points: Sequence[tuple[float, float, float]],
    configured: float | None,
    quality_label: str,
) -> bytes:
    """Student share (1 − fallback rate) and served quality against the confidence threshold,
    on two y axes, with the configured threshold marked and its values read off the curves."""
    pts = sorted((float(t), float(s), float(q)) for t, s, q in points)
    if not pts:
        raise ValueError("no fallback curve points")
    for t, s, _ in pts:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"student share {s} at threshold {t} is outside [0, 1]")
    th = [p[0] for p in pts]
    share = [p[1] for p in pts]
    quality = [p[2] for p in pts]
    fig = _new_figure(7.5, 3.9)
    ax = fig.add_subplot()
    ax_q = ax.twinx()
    ax.plot(th, share, color="#1565c0", marker="o", markersize=3, label="student share")
    ax_q.plot(th, quality, color="#ef6c00", marker="s", markersize=3, label=mpl_text(quality_label))
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    ax.set_xlabel("confidence threshold (below it the teacher answers)")
    ax.set_ylabel("student share (fallback = 1 − share)", color="#1565c0")
    ax_q.set_ylabel(mpl_text(f"served quality: {quality_label}"), color="#ef6c00")
    title = "fallback trade-off"
    if configured is not None:
        at_share = float(np.interp(configured, th, share))
        at_q = float(np.interp(configured, th, quality))
        ax.axvline(
            configured,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"configured {configured:g}",
        )
        title += f" — at {configured:g}: student {at_share:.0%}, quality {at_q:.3g}"
    ax.set_title(mpl_text(title))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    handles_q, labels_q = ax_q.get_legend_handles_labels()
    # Below the axes: inside, the twin axis would draw its curve over the legend.
    fig.legend(
        handles + handles_q, labels + labels_q, fontsize=8, loc="outside lower center", ncols=3
    )
    return _png(fig)
