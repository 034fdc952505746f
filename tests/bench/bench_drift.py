"""Detection delay of the CUSUM drift detector against window KS tests, side by side.

    .venv/bin/python tests/bench/bench_drift.py                # about a minute on two cores
    .venv/bin/python tests/bench/bench_drift.py --seeds 1000 --alpha 0.001 --windows 100 200

Goal (from the issue): at the same false-alarm rate, the sequential detector needs at most half
the detection delay of a fixed-window KS test.

What runs: simulated shadow traffic (`stillhouse.eval.drift_sim`: per-request k3 from a
simulated teacher and a student that samples its answers). Three independent samples of the
unchanged student: a null sample (the noise floor both detectors are calibrated on), a reference
window for the KS test (distinct from the null, see `calibrate_window_ks`), and the test streams.
Both detectors are calibrated to the same stream-level false-alarm rate α (P(any alarm in
`--stream-length` no-drift records)) by bootstrap from the null sample:

* sequential: `calibrate_sequential` with its defaults (one-sided CUSUM on clipped, standardised
  k3) unless `--k-sigma` / `--clip-quantile` say otherwise;
* fixed-window KS (the issue's baseline, the usual batch check): each block of w records,
  tested against the reference once it is full, h from `calibrate_window_ks(step=w)`;
* sliding-window KS (a stronger baseline): the last w records after every record.
  A short window reacts fast but is weak, a long one is strong but slow, so no single w is best
  for every shift: each is shown, and the CUSUM is also compared with the best w per shift
  (a KS tuned in hindsight).

Then, on the same streams for every detector: `--seeds` no-drift streams (the realised
false-alarm rate, FAR) and, per shift, `--seeds` streams in which a worse student (logit noise ×
factor) takes over at `--change-at` plus a per-stream offset below the largest window (so a
change does not always line up with a fixed window's block boundary). Delay = alarm index −
change index; an alarm before the change is a false alarm (column "early", left out of the
delays); no alarm by the end is a miss (an infinite delay, so a median or p90 among the misses
reads "miss"). "shift" is the change of the clipped mean in null standard deviations, the
CUSUM's own scale. Deterministic: every stream has its own seed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stillhouse.eval.drift import (
    SequentialCalibration,
    WindowKsCalibration,
    calibrate_sequential,
    calibrate_window_ks,
    cusum_statistics,
    sliding_ks_statistics,
)
from stillhouse.eval.drift_sim import SimStudent, simulate_divergences, simulate_stream

GOAL = 0.5  # sequential median delay / KS median delay at most this
SHIFTS = {"small": 1.25, "medium": 1.5, "large": 2.0}  # logit-noise factor of the worse student


def first_alarms(alarmed: np.ndarray, offset: int = 0) -> np.ndarray:
    """Per row, the index of the first True (+ offset), or -1 for none."""
    return np.where(alarmed.any(axis=1), np.argmax(alarmed, axis=1) + offset, -1)


def detect(
    streams: np.ndarray,
    cusum: SequentialCalibration,
    ks: dict[str, WindowKsCalibration],
    reference: np.ndarray,
) -> dict[str, np.ndarray]:
    """First alarm index per stream for every detector (-1: none)."""
    out = {"cusum": first_alarms(cusum_statistics(streams, cusum) > cusum.h)}
    for name, cal in ks.items():
        parts = np.array_split(streams, max(1, streams.size * cal.window >> 22))
        stats = np.concatenate([sliding_ks_statistics(p, reference, cal.window) for p in parts])
        hits = first_alarms(stats[:, :: cal.step] > cal.h)
        out[name] = np.where(hits >= 0, hits * cal.step + cal.window - 1, -1)
    return out


def delays(alarms: np.ndarray, change_at: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of alarms before the change, delays of the others with inf for a miss)."""
    early = (alarms >= 0) & (alarms < change_at)
    kept, at = alarms[~early], change_at[~early]
    return int(early.sum()), np.where(kept < 0, np.inf, kept - at).astype(float)


def quantile(values: np.ndarray, q: float) -> float:
    # "higher": an order statistic, so a quantile that falls among the misses is a miss.
    return float(np.quantile(values, q, method="higher")) if values.size else np.inf


def fmt(delay: float) -> str:
    return "miss" if np.isinf(delay) else f"{delay:.0f}"


def ratio(seq: float, other: float) -> float:
    return seq / other if np.isfinite(other) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=300, help="streams per scenario")
    parser.add_argument("--stream-length", type=int, default=1500)
    parser.add_argument("--change-at", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=0.01, help="stream false-alarm rate")
    parser.add_argument("--windows", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--k-sigma", type=float, default=None, help="default: the library's")
    parser.add_argument("--clip-quantile", type=float, default=None, help="default: library's")
    parser.add_argument("--n-null", type=int, default=5000, help="noise-floor sample size")
    parser.add_argument("--n-reference", type=int, default=5000, help="KS reference size")
    args = parser.parse_args()
    started = time.perf_counter()
    length, change, alpha = args.stream_length, args.change_at, args.alpha

    sim = SimStudent()
    null = simulate_divergences(args.n_null, sim, seed=10**6)
    reference = simulate_divergences(args.n_reference, sim, seed=10**6 + 1)
    tuning = {"k_sigma": args.k_sigma, "clip_quantile": args.clip_quantile}
    cusum = calibrate_sequential(
        null, length, alpha, seed=1, n_streams=max(4000, round(40 / alpha)),
        **{name: value for name, value in tuning.items() if value is not None},
    )  # fmt: skip
    n_ks = max(1000, round(10 / alpha))
    ks = {
        f"sliding w={w}": calibrate_window_ks(
            null, reference, w, length, alpha, seed=2, n_streams=n_ks
        )
        for w in args.windows
    }
    # The fixed-window test of the issue: each window of w records tested once it is full.
    fixed = {
        f"fixed w={w}": calibrate_window_ks(
            null, reference, w, length, alpha, seed=3, n_streams=n_ks, step=w
        )
        for w in args.windows
    }
    ks = {**ks, **fixed}
    base = np.stack([simulate_stream(length, sim, seed) for seed in range(args.seeds)])
    far = {name: float(np.mean(a >= 0)) for name, a in detect(base, cusum, ks, reference).items()}

    print(
        f"drift detection on simulated per-request k3: {args.seeds} streams per row, {length} "
        f"records, change at {change}, alpha={alpha:g} per stream; CUSUM k={cusum.k:g} sd, "
        f"clip {cusum.clip:.3g}, h={cusum.h:.2f}; "
        + ", ".join(f"{name} h={cal.h:.3f}" for name, cal in ks.items())
    )
    header = (
        f"{'worse student':<16} {'shift':>5} {'detector':<15} {'FAR':>6} {'early':>5} "
        f"{'misses':>6} {'median':>6} {'p90':>6} {'seq/this':>8}"
    )
    print(header)
    print("-" * len(header))
    kinds = ("sliding", "fixed")
    ratios: dict[str, list[float]] = {name: [] for name in [*ks, *(f"best {k}" for k in kinds)]}
    for index, (label, factor) in enumerate(SHIFTS.items()):
        after = sim.worse(factor)
        seeds = range(10**4 * (index + 1), 10**4 * (index + 1) + args.seeds)
        # A change lands anywhere relative to a fixed window's blocks: its position is drawn
        # per stream from [change_at, change_at + the largest window).
        changes = change + np.random.default_rng(index).integers(0, max(args.windows), args.seeds)
        streams = np.stack([
            simulate_stream(length, sim, s, int(c), after)
            for s, c in zip(seeds, changes, strict=True)
        ])  # fmt: skip
        after_change = np.arange(length) >= changes[:, None]
        shift = (np.minimum(streams, cusum.clip)[after_change].mean() - cusum.mean) / cusum.std
        medians = {}
        for name, alarms in detect(streams, cusum, ks, reference).items():
            early, delay = delays(alarms, changes)
            medians[name] = quantile(delay, 0.5)
            vs = "" if name == "cusum" else f"{ratio(medians['cusum'], medians[name]):.2f}"
            print(
                f"{f'{label} (x{factor:g})':<16} {shift:>5.2f} {name:<15} {far[name]:>6.1%} "
                f"{early:>5} {int(np.isinf(delay).sum()):>6} {fmt(medians[name]):>6} "
                f"{fmt(quantile(delay, 0.9)):>6} {vs:>8}"
            )
            if name != "cusum":
                ratios[name].append(ratio(medians["cusum"], medians[name]))
        for kind in kinds:
            best = min(medians[name] for name in ks if name.startswith(kind))
            ratios[f"best {kind}"].append(ratio(medians["cusum"], best))
    print(
        f"goal: sequential median delay <= {GOAL:g} x the KS test's, same alpha "
        f"(ratio per shift: {', '.join(SHIFTS)})"
    )
    for name, values in ratios.items():
        met = [r <= GOAL for r in values]
        verdict = "met" if all(met) else "met on " + (
            ", ".join(s for s, m in zip(SHIFTS, met, strict=True) if m) or "none")  # fmt: skip
        print(f"  vs {name:<15} {' '.join(f'{r:.2f}' for r in values)}: {verdict}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
