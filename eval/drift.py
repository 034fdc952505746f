"""Drift of the student–teacher divergence: two-sample tests (KS, Mann–Whitney, PSI) of a
current window against a reference, a calibrated one-sided CUSUM for fast alarms, and the
ok / warn / drift decision with its reasons.

    cal = calibrate_sequential(null, stream_length=2000, false_alarm_rate=0.01)
    assessment = assess_drift(reference, current, calibration=cal)   # .state: ok|warn|drift

The input is one number per shadowed request (its per-token k3). Details: docs/evaluation.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import stats

from stillhouse.eval.samples import Values, as_sample

_CHUNK = 1 << 22  # elements per vectorised block in calibration (≈ 32 MiB of float64)


class NoSpreadError(ValueError):
    """The null sample (after clipping) is constant: there is no noise floor to calibrate on,
    e.g. a student that matches the teacher token for token."""


def _check_rate(false_alarm_rate: float, n_streams: int, stream_length: int) -> None:
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate!r}")
    if stream_length < 1:
        raise ValueError(f"stream_length must be >= 1, got {stream_length!r}")
    if n_streams * false_alarm_rate < 1:
        raise ValueError(
            f"n_streams={n_streams} cannot estimate a {1 - false_alarm_rate:g} quantile: "
            f"use at least {math.ceil(1 / false_alarm_rate)} streams (10x that for a stable h)"
        )


# ---- two-sample tests ---------------------------------------------------------------------


def psi(reference: Values, current: Values, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of `current` against `reference`.

    Bins are the reference's quantiles (deciles by default; tied edges merge), the outer bins
    open-ended, so each holds ≈ 1/bins of the reference. PSI = Σ (c − r) · ln(c / r) over the
    bins' shares, each clipped to ≥ `eps` so an empty bin gives a large but finite term.
    Conventional reading (credit scoring): < 0.1 no real change, 0.1–0.25 a moderate shift
    worth a look, ≥ 0.25 a significant shift.
    """
    ref = as_sample(reference, "reference", 1)
    cur = as_sample(current, "current", 1)
    if bins < 2:
        raise ValueError(f"psi needs at least 2 bins, got {bins!r}")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    n_bins = edges.size + 1
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=n_bins) / ref.size
    c = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=n_bins) / cur.size
    r, c = np.maximum(r, eps), np.maximum(c, eps)
    return float(np.sum((c - r) * np.log(c / r)))


@dataclass(frozen=True, slots=True)
class TwoSampleTests:
    """KS and Mann–Whitney (two-sided) of current against reference, and the PSI."""

    ks_statistic: float
    ks_pvalue: float
    mw_statistic: float  # U of the current sample
    mw_pvalue: float
    psi: float

    @property
    def pvalue(self) -> float:
        """Either test rejecting: Bonferroni over the two, ``min(1, 2·min(p_ks, p_mw))``, so
        looking at both does not double the false-alarm rate of looking at one."""
        return min(1.0, 2.0 * min(self.ks_pvalue, self.mw_pvalue))


def two_sample_tests(reference: Values, current: Values, psi_bins: int = 10) -> TwoSampleTests:
    """Compare the current window with the reference; two-sided, since a student that suddenly
    agrees *better* with the teacher is also a change worth explaining."""
    ref = as_sample(reference, "reference", 1)
    cur = as_sample(current, "current", 1)
    ks = stats.ks_2samp(cur, ref)
    mw = stats.mannwhitneyu(cur, ref, alternative="two-sided")
    return TwoSampleTests(
        ks_statistic=float(ks.statistic),
        ks_pvalue=float(ks.pvalue),
        mw_statistic=float(mw.statistic),
        mw_pvalue=float(mw.pvalue),
        psi=psi(ref, cur, psi_bins),
    )


# ---- sequential detector: one-sided CUSUM ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class SequentialCalibration:
    """A calibrated one-sided CUSUM on ``z = (min(x, clip) − mean) / std``:
    ``S_t = max(0, S_{t−1} + z_t − k)``, alarm when ``S_t > h``.

    `clip` winsorises at the null's `clip_quantile`: per-request k3 is heavy-tailed (one token
    the teacher finds far likelier than the student did makes r ≫ 1; skewness ≈ 12 in the
    simulator), and unclipped, single spikes force h so high that a real shift shows late
    (simulated: median delay ~10× longer for a student with 1.5× the logit noise). mean/std
    are those of the clipped null. The price: a drift confined to the top few percent of
    requests is damped. The false-alarm rate holds for streams of up to `stream_length`
    records: restart the detector (or recalibrate) after that many.
    """

    mean: float
    std: float
    clip: float
    k: float  # allowance in standard units: k_sigma
    h: float
    stream_length: int
    false_alarm_rate: float
    n_null: int


def _standardise(values: np.ndarray, cal: SequentialCalibration) -> np.ndarray:
    return (np.minimum(values, cal.clip) - cal.mean) / cal.std


def _cusum_path(z_minus_k: np.ndarray) -> np.ndarray:
    # Lindley's recursion S_t = max(0, S_{t−1} + y_t) in closed form, vectorised along the last
    # axis: with W_t = y_1 + … + y_t, S_t = W_t − min(0, W_1, …, W_t).
    walk = np.cumsum(z_minus_k, axis=-1)
    return walk - np.minimum(np.minimum.accumulate(walk, axis=-1), 0.0)


def cusum_statistics(values: Values, calibration: SequentialCalibration) -> np.ndarray:
    """The CUSUM statistic after each value (along the last axis; starts from S_0 = 0)."""
    x = np.asarray(values, dtype=float)
    if not np.isfinite(x).all():
        raise ValueError("CUSUM values must be finite (no NaN or inf)")
    return _cusum_path(_standardise(x, calibration) - calibration.k)


def first_alarm(values: Values, calibration: SequentialCalibration) -> int | None:
    """Index of the first value at which the CUSUM exceeds h, or None: the pure-function
    form of `Cusum` over a whole stream."""
    path = cusum_statistics(as_sample(values, "values", 0), calibration)
    hits = np.flatnonzero(path > calibration.h)
    return int(hits[0]) if hits.size else None


class Cusum:
    """Online CUSUM: feed one value per shadowed request. The state is three plain numbers
    (`statistic`, `n`, `alarm_index`); the alarm latches until `reset()`, so a dip after an
    alarm does not silently clear it."""

    def __init__(self, calibration: SequentialCalibration) -> None:
        self.calibration = calibration
        self.reset()

    def reset(self) -> None:
        self.statistic = 0.0
        self.n = 0
        self.alarm_index: int | None = None

    def update(self, x: float) -> bool:
        """Add one value; True once the detector has alarmed (now or earlier)."""
        if not math.isfinite(x):
            raise ValueError(f"CUSUM values must be finite, got {x!r}")
        cal = self.calibration
        z = (min(x, cal.clip) - cal.mean) / cal.std
        self.statistic = max(0.0, self.statistic + z - cal.k)
        if self.alarm_index is None and self.statistic > cal.h:
            self.alarm_index = self.n
        self.n += 1
        return self.alarm_index is not None


def _bootstrap_maxima(
    null: np.ndarray,
    stream_length: int,
    n_streams: int,
    seed: int,
    stream_max: Callable[[np.ndarray], np.ndarray],
    per_stream_elements: int,
) -> np.ndarray:
    """Max statistic of each of `n_streams` bootstrap streams drawn from the null sample."""
    rng = np.random.default_rng(seed)
    maxima = np.empty(n_streams)
    chunk = max(1, _CHUNK // per_stream_elements)
    for start in range(0, n_streams, chunk):
        stop = min(start + chunk, n_streams)
        streams = null[rng.integers(0, null.size, size=(stop - start, stream_length))]
        maxima[start:stop] = stream_max(streams)
    return maxima


def calibrate_sequential(
    null_values: Values,
    stream_length: int,
    false_alarm_rate: float = 0.01,
    seed: int = 0,
    n_streams: int = 2000,
    k_sigma: float = 0.25,
    clip_quantile: float = 0.95,
) -> SequentialCalibration:
    """Calibrate the CUSUM on a null sample (the noise floor: no change).

    Standardises with the clipped null's mean and std. The allowance k = `k_sigma` std makes
    the CUSUM quickest for a shift of 2·k: 0.25 targets a 0.5 std shift, because per-request
    k3 is noisy and the regressions that matter are small against its spread (a student with
    1.25×–1.5× the logit noise moves the clipped mean by ≈ 0.3–0.7 std); the textbook 0.5
    (a 1 std shift) was 2–3× slower on the smallest of those in the bench and no faster on
    large ones. The clip at the null's 0.95 quantile was the best of 0.9–0.999 there.

    h is the (1 − α) quantile of the maximum CUSUM over `n_streams` bootstrap streams of
    `stream_length` records resampled from the null, so P(any alarm in a no-drift stream of
    that length) ≈ α. The bootstrap keeps the null's real, skewed shape instead of assuming
    normality. The null's own sampling error (mean and std estimated from `n_null` values) is
    not in the bootstrap, so the realised rate can be off by a factor of ~1.5 either way with
    a few thousand null values: use that many or more, and measure it as the bench does.
    """
    null = as_sample(null_values, "null_values", 10)
    _check_rate(false_alarm_rate, n_streams, stream_length)
    if not k_sigma >= 0:
        raise ValueError(f"k_sigma must be >= 0, got {k_sigma!r}")
    if not 0.5 <= clip_quantile <= 1.0:
        raise ValueError(f"clip_quantile must be in [0.5, 1], got {clip_quantile!r}")
    clip = float(np.quantile(null, clip_quantile))
    clipped = np.minimum(null, clip)
    std = float(clipped.std(ddof=1))
    if not std > 0:
        raise NoSpreadError("null_values have no spread: a detector cannot be calibrated on them")
    base = SequentialCalibration(
        mean=float(clipped.mean()),
        std=std,
        clip=clip,
        k=float(k_sigma),
        h=math.inf,
        stream_length=stream_length,
        false_alarm_rate=false_alarm_rate,
        n_null=null.size,
    )
    maxima = _bootstrap_maxima(
        clipped,
        stream_length,
        n_streams,
        seed,
        lambda s: cusum_statistics(s, base).max(axis=1),
        stream_length,
    )
    h = float(np.quantile(maxima, 1 - false_alarm_rate))
    return replace(base, h=h)


# ---- baseline: fixed-window KS after every record --------------------------------------------


def sliding_ks_statistics(values: Values, reference: Values, window: int) -> np.ndarray:
    """Two-sample KS statistic of every window of `window` consecutive values (along the last
    axis) against `reference`; element j is the window ending at value j + window − 1.

    Exact, ties included, without scipy's per-call overhead: with the window sorted, r_i and
    r⁻_i the numbers of reference values ≤ and < its i-th value, and m the reference size,
    D = max_i max(i/w − r_i/m, r⁻_i/m − (i − 1)/w) — the two empirical CDFs compared just at
    and just before every window value, which is where their gap can peak.
    """
    ref = np.sort(as_sample(reference, "reference", 1))
    x = np.asarray(values, dtype=float)
    if not 1 <= window <= x.shape[-1]:
        raise ValueError(f"window must be in [1, {x.shape[-1]}], got {window!r}")
    m = ref.size
    # One integer key per value that sorts like the value and carries both ranks; int32 when
    # it fits (sorting is most of the cost, and half-width keys sort about twice as fast).
    dtype = np.int32 if (m + 1) ** 2 < 2**31 and m * window < 2**31 else np.int64
    at = np.searchsorted(ref, x, side="right").astype(dtype)
    key = at * dtype(m + 1) + np.searchsorted(ref, x, side="left").astype(dtype)
    windows = np.sort(sliding_window_view(key, window, axis=-1), axis=-1)
    at, before = np.divmod(windows, dtype(m + 1))
    # The two gaps in integer units of 1 / (m·w), exact; one division at the end.
    i_m = np.arange(1, window + 1, dtype=dtype) * dtype(m)
    above = (i_m - at * dtype(window)).max(axis=-1)
    below = (before * dtype(window) - (i_m - dtype(m))).max(axis=-1)
    return np.maximum(above, below) / (m * window)


@dataclass(frozen=True, slots=True)
class WindowKsCalibration:
    """Threshold on the window KS statistic (alarm when D > h) for a stream-level false-alarm
    rate, against a fixed reference. `step` 1 tests after every record (sliding windows);
    `step` = `window` tests each window once it is full (fixed, non-overlapping windows, the
    usual batch job: "compare this hour's traffic with the reference")."""

    window: int
    h: float
    stream_length: int
    false_alarm_rate: float
    n_null: int
    n_reference: int
    step: int = 1


def calibrate_window_ks(
    null_values: Values,
    reference: Values,
    window: int,
    stream_length: int,
    false_alarm_rate: float = 0.01,
    seed: int = 0,
    n_streams: int = 1000,
    step: int = 1,
) -> WindowKsCalibration:
    """h = the (1 − α) quantile of the largest sliding-window KS statistic (against
    `reference`) over bootstrap streams from the null sample, as for the CUSUM.

    Pass a reference that is *not* the null sample: streams resampled from the reference
    itself sit closer to it than fresh no-drift traffic does, which would make h too low.
    """
    null = as_sample(null_values, "null_values", 10)
    ref = as_sample(reference, "reference", 10)
    _check_rate(false_alarm_rate, n_streams, stream_length)
    if not 1 <= window <= stream_length:
        raise ValueError(f"window must be in [1, stream_length={stream_length}], got {window!r}")
    if not 1 <= step <= window:
        raise ValueError(f"step must be in [1, window={window}], got {step!r}")
    maxima = _bootstrap_maxima(
        null,
        stream_length,
        n_streams,
        seed,
        lambda s: sliding_ks_statistics(s, ref, window)[..., ::step].max(axis=1),
        stream_length * window,
    )
    return WindowKsCalibration(
        window=window,
        h=float(np.quantile(maxima, 1 - false_alarm_rate)),
        stream_length=stream_length,
        false_alarm_rate=false_alarm_rate,
        n_null=null.size,
        n_reference=ref.size,
        step=step,
    )


def first_ks_alarm(
    values: Values, reference: Values, calibration: WindowKsCalibration
) -> int | None:
    """Index of the record after which the window KS first exceeds h, or None."""
    x = as_sample(values, "values", 0)
    if x.size < calibration.window:
        return None
    step = calibration.step
    stats = sliding_ks_statistics(x, reference, calibration.window)[::step]
    hits = np.flatnonzero(stats > calibration.h)
    return int(hits[0]) * step + calibration.window - 1 if hits.size else None


# ---- decision ------------------------------------------------------------------------------


class DriftState(StrEnum):
    OK = "ok"
    WARN = "warn"
    DRIFT = "drift"


@dataclass(frozen=True, slots=True)
class DriftConfig:
    """Levels of the ok / warn / drift decision (see `drift_state`)."""

    warn_alpha: float = 0.01
    drift_alpha: float = 0.001
    psi_warn: float = 0.1
    psi_drift: float = 0.25
    psi_bins: int = 10
    min_samples: int = 30  # per window, below which the two-sample tests are not run

    def __post_init__(self) -> None:
        if not 0.0 < self.drift_alpha <= self.warn_alpha < 1.0:
            raise ValueError(
                "need 0 < drift_alpha <= warn_alpha < 1, got "
                f"drift_alpha={self.drift_alpha!r}, warn_alpha={self.warn_alpha!r}"
            )
        if not 0.0 < self.psi_warn <= self.psi_drift:
            raise ValueError(
                "need 0 < psi_warn <= psi_drift, got "
                f"psi_warn={self.psi_warn!r}, psi_drift={self.psi_drift!r}"
            )
        if self.psi_bins < 2:
            raise ValueError(f"psi_bins must be >= 2, got {self.psi_bins!r}")
        if self.min_samples < 2:
            raise ValueError(f"min_samples must be >= 2, got {self.min_samples!r}")


def drift_state(
    tests: TwoSampleTests | None, sequential_alarm: bool, config: DriftConfig
) -> tuple[DriftState, tuple[str, ...]]:
    """The decision and its reasons.

    drift: the sequential detector alarmed, or the tests reject at `drift_alpha` *and* PSI ≥
    `psi_drift` (significant and large: with big windows a tiny, harmless shift is already
    significant, so significance alone never says drift); warn: p < `warn_alpha` or PSI ≥
    `psi_warn`; else ok. p is `TwoSampleTests.pvalue` (KS and Mann–Whitney, Bonferroni).
    """
    reasons: list[str] = []
    if sequential_alarm:
        reasons.append("cusum alarm")
    strict = warn = False
    if tests is not None:
        p, value = tests.pvalue, tests.psi
        if p < config.warn_alpha:
            level = config.drift_alpha if p < config.drift_alpha else config.warn_alpha
            reasons.append(f"p {p:.2g} < {level:g}")
        if value >= config.psi_warn:
            level = config.psi_drift if value >= config.psi_drift else config.psi_warn
            reasons.append(f"psi {value:.3g} >= {level:g}")
        strict = p < config.drift_alpha and value >= config.psi_drift
        warn = p < config.warn_alpha or value >= config.psi_warn
    if sequential_alarm or strict:
        return DriftState.DRIFT, tuple(reasons)
    return (DriftState.WARN if warn else DriftState.OK), tuple(reasons)


@dataclass(frozen=True, slots=True)
class DriftAssessment:
    """Everything behind one drift decision. `sequential_statistic` is the largest CUSUM
    value over the current window (> threshold exactly when it alarmed)."""

    n_reference: int
    n_current: int
    tests: TwoSampleTests | None
    sequential_alarm_index: int | None
    sequential_statistic: float | None
    sequential_threshold: float | None
    state: DriftState
    reasons: tuple[str, ...]


def assess_drift(
    reference: Values,
    current: Values,
    calibration: SequentialCalibration | None = None,
    config: DriftConfig | None = None,
) -> DriftAssessment:
    """Run the tests (when both windows have `min_samples`) and the CUSUM over `current`
    (when calibrated), and decide. `current` should be at most the calibration's
    `stream_length` long, or the CUSUM's false-alarm rate is above the calibrated one."""
    config = config or DriftConfig()
    ref = as_sample(reference, "reference", 0)
    cur = as_sample(current, "current", 0)
    tests = None
    if min(ref.size, cur.size) >= config.min_samples:
        tests = two_sample_tests(ref, cur, config.psi_bins)
    alarm = statistic = threshold = None
    if calibration is not None and cur.size:
        path = cusum_statistics(cur, calibration)
        statistic, threshold = float(path.max()), calibration.h
        hits = np.flatnonzero(path > calibration.h)
        alarm = int(hits[0]) if hits.size else None
    state, reasons = drift_state(tests, alarm is not None, config)
    if tests is None:
        reasons += (f"too few records for two-sample tests (< {config.min_samples})",)
    return DriftAssessment(
        n_reference=ref.size,
        n_current=cur.size,
        tests=tests,
        sequential_alarm_index=alarm,
        sequential_statistic=statistic,
        sequential_threshold=threshold,
        state=state,
        reasons=reasons,
    )
