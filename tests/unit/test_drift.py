"""Drift detection on per-request divergence: PSI and the two-sample tests, the exact
sliding-window KS, the CUSUM (hand-computed, online = offline, latched), calibration to a
stream-level false-alarm rate, the acceptance criteria from the issue on simulated shadow
traffic, the ok / warn / drift table, `DriftConfig` validation, and the simulator itself."""

import math

import numpy as np
import pytest
from scipy import stats

from stillhouse.eval.divergence import request_divergence
from stillhouse.eval.drift import (
    Cusum,
    DriftConfig,
    DriftState,
    SequentialCalibration,
    TwoSampleTests,
    assess_drift,
    calibrate_sequential,
    calibrate_window_ks,
    cusum_statistics,
    drift_state,
    first_alarm,
    first_ks_alarm,
    psi,
    sliding_ks_statistics,
    two_sample_tests,
)
from stillhouse.eval.drift_sim import (
    SimStudent,
    simulate_divergences,
    simulate_records,
    simulate_stream,
)

SIM = SimStudent()
WORSE = SIM.worse(1.5)  # mean per-request k3 roughly doubles: a clearly worse re-distillation


def calibration(**changes) -> SequentialCalibration:
    fields = {"mean": 0.0, "std": 1.0, "clip": math.inf, "k": 0.5, "h": 1.0,
              "stream_length": 100, "false_alarm_rate": 0.01, "n_null": 100}  # fmt: skip
    return SequentialCalibration(**{**fields, **changes})


# ---- PSI and two-sample tests --------------------------------------------------------------


def test_psi_on_a_hand_computed_two_bin_example():
    # Reference median 1.5 splits the bins {0, 1} | {2, 3}: shares r = (1/2, 1/2).
    # Current (0, 0, 0, 3): c = (3/4, 1/4). PSI = ¼·ln(3/2) + (−¼)·ln(1/2) = ¼·ln 3.
    assert psi([0, 1, 2, 3], [0, 0, 0, 3], bins=2) == pytest.approx(math.log(3) / 4)


def test_psi_is_zero_for_identical_samples_and_large_for_a_shift():
    x = np.random.default_rng(0).normal(size=2000)
    assert psi(x, x) == 0.0
    assert psi(x, x + 1.0) > 0.25  # a one-std shift is "significant" on the usual scale
    assert psi(x, np.full(10, 100.0)) < 20  # an empty bin gives a finite (eps-clipped) term


def test_two_sample_tests_separate_a_shift_from_a_fresh_sample_of_the_same_distribution():
    rng = np.random.default_rng(1)
    reference = rng.lognormal(size=500)
    same = two_sample_tests(reference, rng.lognormal(size=500))
    shifted = two_sample_tests(reference, rng.lognormal(0.5, size=500))
    assert same.ks_pvalue > 0.05 and same.mw_pvalue > 0.05 and same.psi < 0.1
    assert shifted.ks_pvalue < 1e-6 and shifted.mw_pvalue < 1e-6 and shifted.psi > 0.1
    assert shifted.pvalue == pytest.approx(2 * min(shifted.ks_pvalue, shifted.mw_pvalue))
    assert TwoSampleTests(0.1, 0.8, 1.0, 0.9, 0.0).pvalue == 1.0  # Bonferroni caps at 1


@pytest.mark.parametrize("ties", [False, True])
def test_sliding_ks_statistics_match_scipy_for_every_window(ties):
    rng = np.random.default_rng(2)
    reference, values = rng.normal(size=60), rng.normal(0.4, 1.0, size=120)
    if ties:  # rounding makes ties within and across the samples
        reference, values = np.round(reference), np.round(values)
    got = sliding_ks_statistics(values, reference, 25)
    expected = [stats.ks_2samp(values[j : j + 25], reference).statistic for j in range(96)]
    np.testing.assert_allclose(got, expected, atol=1e-12)


# ---- CUSUM -----------------------------------------------------------------------------------


def test_cusum_on_a_hand_computed_stream():
    # z − k = 0.5, 0.5, −0.5, 1.5: S = 0.5, 1.0, 0.5, 2.0; h = 1 is exceeded (strictly) at 3.
    cal = calibration()
    np.testing.assert_allclose(cusum_statistics([1, 1, 0, 2], cal), [0.5, 1.0, 0.5, 2.0])
    assert first_alarm([1, 1, 0, 2], cal) == 3
    assert first_alarm([1, 1, 0, 0], cal) is None
    # It resets at zero: a long run below the mean does not bank credit against a later rise.
    assert first_alarm([-100, 1, 1, 1], cal) == 3


def test_cusum_clips_values_at_the_calibrated_clip():
    cal = calibration(clip=2.0, h=5.0)
    assert cusum_statistics([1e6], cal)[0] == pytest.approx(1.5)


def test_online_cusum_agrees_with_the_offline_path_and_latches_its_alarm():
    cal = calibration(mean=0.2, std=0.5, k=0.25, h=4.0)
    values = np.random.default_rng(3).normal(0.6, 0.5, size=60)
    detector = Cusum(cal)
    alarms = [detector.update(float(x)) for x in values]
    expected = first_alarm(values, cal)
    assert expected is not None and detector.alarm_index == expected
    assert alarms == [i >= expected for i in range(len(values))]  # latched after the alarm
    assert detector.statistic == pytest.approx(cusum_statistics(values, cal)[-1])
    detector.reset()
    assert (detector.statistic, detector.n, detector.alarm_index) == (0.0, 0, None)
    with pytest.raises(ValueError, match="finite"):
        detector.update(float("nan"))


def test_calibrated_cusum_false_alarm_rate_is_close_to_alpha_on_fresh_null_streams():
    rng = np.random.default_rng(4)
    null = rng.gamma(2.0, size=20_000)  # skewed, like per-request k3
    cal = calibrate_sequential(null, 200, 0.1, seed=1, n_streams=4000)
    fresh = rng.gamma(2.0, size=(2000, 200))
    realised = (cusum_statistics(fresh, cal) > cal.h).any(axis=1).mean()
    assert 0.07 < realised < 0.13
    assert (cal.k, cal.clip, cal.n_null) == (0.25, np.quantile(null, 0.95), 20_000)


def test_calibration_is_deterministic_and_h_grows_with_stream_length_and_stricter_alpha():
    null = np.random.default_rng(5).exponential(size=3000)
    base = calibrate_sequential(null, 500, 0.05, seed=7, n_streams=500)
    assert base == calibrate_sequential(null, 500, 0.05, seed=7, n_streams=500)
    assert calibrate_sequential(null, 2000, 0.05, seed=7, n_streams=500).h > base.h
    assert calibrate_sequential(null, 500, 0.005, seed=7, n_streams=500).h > base.h


@pytest.mark.parametrize(
    ("null", "kwargs", "message"),
    [
        (np.ones(100), {}, "no spread"),
        (np.arange(5.0), {}, "at least 10"),
        (np.arange(100.0), {"false_alarm_rate": 0.0}, "false_alarm_rate"),
        (np.arange(100.0), {"false_alarm_rate": 0.001, "n_streams": 500}, "1000 streams"),
        (np.arange(100.0), {"clip_quantile": 0.2}, "clip_quantile"),
        (np.arange(100.0), {"k_sigma": -1.0}, "k_sigma"),
        (np.array([1.0] * 50 + [np.nan]), {}, "finite"),
    ],
)
def test_calibrate_sequential_rejects_unusable_input(null, kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate_sequential(null, **{"stream_length": 100, **kwargs})


def test_window_ks_calibration_holds_its_false_alarm_rate_and_reports_the_window_end():
    rng = np.random.default_rng(6)
    null, reference = rng.normal(size=4000), rng.normal(size=4000)
    cal = calibrate_window_ks(null, reference, 40, 300, 0.1, seed=2, n_streams=400)
    fresh = rng.normal(size=(1000, 300))
    realised = (sliding_ks_statistics(fresh, reference, 40) > cal.h).any(axis=1).mean()
    assert 0.05 < realised < 0.16
    shifted = np.concatenate([rng.normal(size=100), rng.normal(3.0, 1.0, size=200)])
    alarm = first_ks_alarm(shifted, reference, cal)
    assert alarm is not None and 100 <= alarm < 140  # the index of the record that tipped it
    assert first_ks_alarm(shifted[:39], reference, cal) is None  # window never filled


def test_fixed_window_ks_tests_each_full_block_once_at_its_calibrated_rate():
    rng = np.random.default_rng(7)
    null, reference = rng.normal(size=4000), rng.normal(size=4000)
    cal = calibrate_window_ks(null, reference, 40, 300, 0.1, seed=2, n_streams=400, step=40)
    sliding = calibrate_window_ks(null, reference, 40, 300, 0.1, seed=2, n_streams=400)
    assert cal.step == 40 and cal.h < sliding.h  # fewer tests per stream: a lower bar
    fresh = rng.normal(size=(1000, 300))
    realised = (sliding_ks_statistics(fresh, reference, 40)[:, ::40] > cal.h).any(axis=1).mean()
    assert 0.05 < realised < 0.16
    shifted = np.concatenate([rng.normal(size=100), rng.normal(3.0, 1.0, size=200)])
    alarm = first_ks_alarm(shifted, reference, cal)
    # Only at the end of a block (records 39, 79, 119, ...): the block 80..119 is the first
    # with enough shifted records.
    assert alarm is not None and (alarm + 1) % 40 == 0 and alarm >= 119
    with pytest.raises(ValueError, match="step"):
        calibrate_window_ks(null, reference, 40, 300, 0.1, step=41)


# ---- acceptance criteria (the issue) ---------------------------------------------------------


@pytest.fixture(scope="module")
def noise_floor_calibration() -> SequentialCalibration:
    # Calibrated on a separate null sample of the unchanged student, never on the test streams.
    null = simulate_divergences(5000, SIM, seed=2024)
    return calibrate_sequential(null, 1000, false_alarm_rate=0.001, seed=0, n_streams=5000)


@pytest.mark.parametrize("seed", range(20))
def test_a_worse_student_swapped_in_halfway_is_detected_within_300_records(
    seed, noise_floor_calibration
):
    stream = simulate_stream(1000, SIM, seed, change_at=500, after=WORSE)
    alarm = first_alarm(stream, noise_floor_calibration)
    assert alarm is not None and 500 <= alarm < 800  # not before the change, ≤ 300 after


@pytest.mark.parametrize("seed", range(100, 120))
def test_a_no_drift_stream_of_the_same_length_raises_no_alarm(seed, noise_floor_calibration):
    assert first_alarm(simulate_stream(1000, SIM, seed), noise_floor_calibration) is None


# ---- decision ------------------------------------------------------------------------------


def sample_tests(p: float, psi_value: float) -> TwoSampleTests:
    return TwoSampleTests(0.1, p, 10.0, p, psi_value)  # pvalue = min(1, 2p)


@pytest.mark.parametrize(
    ("tests", "alarm", "state", "reasons"),
    [
        (None, False, DriftState.OK, ()),
        (sample_tests(0.4, 0.01), False, DriftState.OK, ()),
        (None, True, DriftState.DRIFT, ("cusum alarm",)),
        (sample_tests(0.4, 0.01), True, DriftState.DRIFT, ("cusum alarm",)),
        (sample_tests(1e-5, 0.3), False, DriftState.DRIFT, ("p 2e-05 < 0.001", "psi 0.3 >= 0.25")),
        (sample_tests(1e-5, 0.05), False, DriftState.WARN, ("p 2e-05 < 0.001",)),  # big n, tiny
        (sample_tests(0.4, 0.3), False, DriftState.WARN, ("psi 0.3 >= 0.25",)),  # large, not sig.
        (sample_tests(0.004, 0.3), False, DriftState.WARN, ("p 0.008 < 0.01", "psi 0.3 >= 0.25")),
        (sample_tests(0.004, 0.01), False, DriftState.WARN, ("p 0.008 < 0.01",)),
        (sample_tests(0.4, 0.12), False, DriftState.WARN, ("psi 0.12 >= 0.1",)),
        (sample_tests(0.006, 0.01), False, DriftState.OK, ()),  # 2 × 0.006 = 0.012: not < 0.01
    ],
)
def test_drift_state_table(tests, alarm, state, reasons):
    assert drift_state(tests, alarm, DriftConfig()) == (state, reasons)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warn_alpha": 0.0}, "warn_alpha"),
        ({"warn_alpha": 1.0}, "warn_alpha"),
        ({"drift_alpha": 0.05}, "drift_alpha <= warn_alpha"),
        ({"drift_alpha": float("nan")}, "drift_alpha"),
        ({"psi_warn": 0.0}, "psi_warn"),
        ({"psi_warn": 0.3}, "psi_warn <= psi_drift"),
        ({"psi_bins": 1}, "psi_bins"),
        ({"min_samples": 1}, "min_samples"),
    ],
)
def test_drift_config_rejects_bad_ranges(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DriftConfig(**kwargs)


def test_drift_report_on_simulated_windows(noise_floor_calibration):
    reference = simulate_divergences(1000, SIM, seed=7)
    same = assess_drift(reference, simulate_divergences(600, SIM, seed=8), noise_floor_calibration)
    assert same.state == DriftState.OK and same.sequential_alarm_index is None
    assert same.sequential_statistic < same.sequential_threshold == noise_floor_calibration.h
    worse = assess_drift(
        reference, simulate_divergences(600, WORSE, seed=9), noise_floor_calibration
    )
    assert worse.state == DriftState.DRIFT and worse.reasons[0] == "cusum alarm"
    assert worse.tests.pvalue < 1e-6 and (worse.n_reference, worse.n_current) == (1000, 600)
    few = assess_drift(reference, reference[:10])
    assert few.tests is None and few.sequential_alarm_index is None and few.state == "ok"
    assert few.reasons == ("too few records for two-sample tests (< 30)",)


# ---- simulator -------------------------------------------------------------------------------


def test_simulated_records_give_the_fast_paths_divergences():
    records = simulate_records(50, SIM, seed=11, top_k=4)
    np.testing.assert_allclose(
        [request_divergence(r).k3 for r in records], simulate_divergences(50, SIM, seed=11)
    )
    assert all(len(r.teacher_top[0]) == 4 and r.student_top for r in records)
    assert simulate_records(5, SIM, seed=11, top_k=None)[0].teacher_top is None


def test_simulated_streams_are_deterministic_and_a_worse_student_diverges_more():
    stream = simulate_stream(2000, SIM, seed=12, change_at=1000, after=WORSE)
    np.testing.assert_array_equal(stream, simulate_stream(2000, SIM, 12, 1000, WORSE))
    assert stream[1000:].mean() > 1.5 * stream[:1000].mean()
    with pytest.raises(ValueError, match="change point"):
        simulate_stream(10, SIM, 0, change_at=20, after=WORSE)


def test_a_reference_without_spread_reports_no_drift_decision_instead_of_failing():
    """A student that matches the teacher token for token has k3 = 0 on every request: there
    is no noise floor to calibrate a detector on, and the drift job says so (it used to raise)."""
    from stillhouse.common.eval_settings import DriftSettings
    from stillhouse.eval.divergence import RequestDivergence
    from stillhouse.eval.student_drift import student_drift

    current = [
        RequestDivergence(f"r{i}", float(i), "m", 4, 0.0, 0.0, 0.0, 0.0, None, None, None)
        for i in range(40)
    ]
    result = student_drift("m", "champion", current, [0.0] * 30, "first records", DriftSettings())
    assert result.assessment is None and result.calibration is None
    assert result.divergence is not None and result.divergence.k3_mean == 0.0
    assert "no spread" in result.note
