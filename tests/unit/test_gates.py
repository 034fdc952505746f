"""The promotion gates, table-style over hand-built evidence, and once over real A/B results."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from stillhouse.common.config import Settings
from stillhouse.common.eval_settings import DriftSettings
from stillhouse.common.rollout_settings import GateSettings
from stillhouse.common.traffic import AbChange, TrafficRecord
from stillhouse.eval import student_drift
from stillhouse.eval.ab_summary import build_ab_summary
from stillhouse.eval.drift_sim import SimStudent, simulate_records
from stillhouse.eval.store import StoredJudgment
from stillhouse.rollout.gate_status import GATE_NAMES, combined_status
from stillhouse.rollout.gates import (
    ArmEvidence,
    GateEvidence,
    evaluate_gates,
    evidence_from,
    gate_divergence,
    gate_fallback,
    gate_latency,
    gate_not_worse,
    gate_srm,
    gate_win_or_tie,
)

CFG = GateSettings()  # min_samples 40, alpha 0.05, margins 0.1 / 0.05 / 0.05, bar 0.8, ×1.5

CHAMPION = ArmEvidence(
    requests=1000,
    fallback_rate=0.10,
    latency_p99=1.0,
    pairwise_n=200,
    win_or_tie_rate=0.90,
    pairwise_score=-0.05,
    divergence_n=200,
    divergence_k3=0.06,
    divergence_ci=(0.05, 0.07),
)
CHALLENGER = ArmEvidence(
    requests=300,
    fallback_rate=0.11,
    latency_p99=1.1,
    pairwise_n=200,
    win_or_tie_rate=0.92,
    pairwise_score=0.0,
    divergence_n=200,
    divergence_k3=0.07,
    divergence_ci=(0.06, 0.08),
)
GOOD = GateEvidence(
    champion=CHAMPION,
    challenger=CHALLENGER,
    pairwise_diff=0.05,
    pairwise_diff_se=0.03,
    pairwise_interval=(-0.05, 0.15),
    pairwise_tau=0.2,
    srm_p_value=0.5,
    srm_ok=True,
    srm_units=1300,
)


def ev(
    champion: dict[str, Any] | None = None, challenger: dict[str, Any] | None = None, **top: Any
) -> GateEvidence:
    """GOOD with some numbers changed."""
    return dataclasses.replace(
        GOOD,
        champion=dataclasses.replace(CHAMPION, **(champion or {})),
        challenger=dataclasses.replace(CHALLENGER, **(challenger or {})),
        **top,
    )


def test_the_reference_evidence_passes_every_gate():
    gates = evaluate_gates(GOOD, CFG, phase="ramp")
    assert [(r.name, r.status) for r in gates.results] == [
        ("not_worse", "pass"),
        ("win_or_tie", "pass"),
        ("divergence", "pass"),
        ("fallback", "pass"),
        ("latency", "pass"),
        ("srm", "pass"),
    ]
    assert gates.status == "pass"


NOT_WORSE = [
    ("surely_worse_by_more_than_the_margin", ev(pairwise_diff=-0.4), "fail"),
    ("interval_straddles_the_margin", ev(pairwise_diff=-0.1), "inconclusive"),
    ("better", ev(pairwise_diff=0.2), "pass"),
    ("too_few_challenger_judgments", ev(challenger={"pairwise_n": 12}), "inconclusive"),
    ("too_few_champion_judgments", ev(champion={"pairwise_n": 10}), "inconclusive"),
    ("both_arms_constant", ev(pairwise_diff=0.0, pairwise_diff_se=0.0, pairwise_tau=None), "pass"),
    (
        "no_champion_and_challenger_close_to_teacher",
        ev(
            champion={"pairwise_n": 0}, challenger={"pairwise_score": 0.05, "win_or_tie_rate": 0.95}
        ),
        "pass",
    ),
    (
        "no_champion_and_challenger_far_below_teacher",
        ev(champion={"pairwise_n": 0}, challenger={"pairwise_score": -0.5, "win_or_tie_rate": 0.5}),
        "fail",
    ),
]


@pytest.mark.parametrize(("case", "evidence", "want"), NOT_WORSE, ids=[c[0] for c in NOT_WORSE])
def test_not_worse_decides_on_the_always_valid_interval_against_the_margin(case, evidence, want):
    result = gate_not_worse(evidence, CFG)
    assert result.status == want, result.detail
    assert result.limit in (None, -0.1)


def test_not_worse_below_min_samples_says_how_many_it_has():
    result = gate_not_worse(ev(challenger={"pairwise_n": 12}), CFG)
    assert "n=12 < 40" in result.detail


def test_not_worse_recomputes_its_interval_at_the_gates_alpha():
    evidence = ev(pairwise_diff=-0.02)
    loose = gate_not_worse(evidence, CFG.model_copy(update={"alpha": 0.5}))
    strict = gate_not_worse(evidence, CFG.model_copy(update={"alpha": 0.01}))
    assert loose.status == "pass" and strict.status == "inconclusive"
    assert loose.interval and strict.interval and strict.interval[0] < loose.interval[0]


WIN_OR_TIE = [
    ("well_above_the_bar", ev(), "pass"),
    (
        "a_good_challenger_on_40_judgments",
        ev(challenger={"pairwise_n": 40, "win_or_tie_rate": 0.95}),
        "pass",
    ),
    ("surely_below_the_bar", ev(challenger={"win_or_tie_rate": 0.6}), "fail"),
    (
        "below_but_the_interval_reaches_the_bar",
        ev(challenger={"pairwise_n": 50, "win_or_tie_rate": 0.76}),
        "inconclusive",
    ),
    ("too_few", ev(challenger={"pairwise_n": 12, "win_or_tie_rate": 0.1}), "inconclusive"),
]


@pytest.mark.parametrize(("case", "evidence", "want"), WIN_OR_TIE, ids=[c[0] for c in WIN_OR_TIE])
def test_win_or_tie_passes_at_the_bar_and_fails_only_when_surely_below(case, evidence, want):
    result = gate_win_or_tie(evidence, CFG)
    assert result.status == want, result.detail
    assert result.limit == 0.8


def test_win_or_tie_detail_shows_rate_interval_n_and_bar():
    detail = gate_win_or_tie(GOOD, CFG).detail
    assert detail.startswith("challenger win-or-tie vs teacher 0.92 [0.")
    assert "on 200" in detail and "bar 0.80" in detail


DIVERGENCE = [
    ("within_the_margin", ev(), "pass"),
    (
        "surely_beyond_the_margin",
        ev(challenger={"divergence_k3": 0.25, "divergence_ci": (0.21, 0.29)}),
        "fail",
    ),
    (
        "beyond_on_the_point_but_intervals_overlap",
        ev(challenger={"divergence_k3": 0.13, "divergence_ci": (0.09, 0.17)}),
        "inconclusive",
    ),
    (
        "no_challenger_shadow_records",
        ev(challenger={"divergence_n": 0, "divergence_k3": None, "divergence_ci": None}),
        "inconclusive",
    ),
    # A thin champion: the teacher (KL 0) stands in; a pass stands, a fail waits.
    (
        "too_few_champion_records_and_far_from_the_teacher",
        ev(champion={"divergence_n": 10}),
        "inconclusive",
    ),
    (
        "too_few_champion_records_and_close_to_the_teacher",
        ev(
            champion={"divergence_n": 1},
            challenger={"divergence_k3": 0.03, "divergence_ci": (0.02, 0.04)},
        ),
        "pass",
    ),
    (
        "no_champion_records_and_close_to_the_teacher",
        ev(
            champion={"divergence_n": 0, "divergence_k3": None},
            challenger={"divergence_k3": 0.03, "divergence_ci": (0.02, 0.04)},
        ),
        "pass",
    ),
    (
        "no_champion_records_and_surely_far_from_the_teacher",
        ev(champion={"divergence_n": 0, "divergence_k3": None}),
        "fail",
    ),
]


@pytest.mark.parametrize(("case", "evidence", "want"), DIVERGENCE, ids=[c[0] for c in DIVERGENCE])
def test_divergence_allows_the_margin_over_the_champion(case, evidence, want):
    result = gate_divergence(evidence, CFG)
    assert result.status == want, result.detail


def test_divergence_with_a_thin_champion_says_it_waits_for_the_champion():
    result = gate_divergence(ev(champion={"divergence_n": 10}), CFG)
    assert "the teacher (champion shadow records: n=10)" in result.detail
    assert "not decided until champion shadow records reach 40" in result.detail


def test_divergence_without_champion_records_compares_with_the_teacher():
    result = gate_divergence(ev(champion={"divergence_n": 0, "divergence_k3": None}), CFG)
    assert "the teacher" in result.detail and result.observed == pytest.approx(0.07)


FALLBACK = [
    ("within_the_margin", ev(), "pass"),
    ("surely_beyond_the_margin", ev(challenger={"fallback_rate": 0.4}), "fail"),
    (
        "beyond_on_the_point_on_few_requests",
        ev(challenger={"fallback_rate": 0.17, "requests": 60}),
        "inconclusive",
    ),
    ("too_few_requests", ev(challenger={"requests": 12, "fallback_rate": 0.9}), "inconclusive"),
    (
        "no_champion_requests_and_rarely_falls_back",
        ev(champion={"requests": 0, "fallback_rate": None}, challenger={"fallback_rate": 0.03}),
        "pass",
    ),
    (
        "no_champion_requests_and_often_falls_back",
        ev(champion={"requests": 0, "fallback_rate": None}, challenger={"fallback_rate": 0.3}),
        "fail",
    ),
    (
        "too_few_champion_requests_and_rarely_falls_back",
        ev(champion={"requests": 5}, challenger={"fallback_rate": 0.03}),
        "pass",
    ),
    (
        "too_few_champion_requests_and_often_falls_back",
        ev(champion={"requests": 5}, challenger={"fallback_rate": 0.3}),
        "inconclusive",
    ),
]


@pytest.mark.parametrize(("case", "evidence", "want"), FALLBACK, ids=[c[0] for c in FALLBACK])
def test_fallback_rate_allows_the_margin_over_the_champion(case, evidence, want):
    result = gate_fallback(evidence, CFG)
    assert result.status == want, result.detail


LATENCY = [
    ("within_the_ratio", ev(), "ramp", "pass"),
    ("over_the_ratio", ev(challenger={"latency_p99": 2.0}), "ramp", "fail"),
    (
        "over_the_ratio_on_too_few_requests_for_a_p99",
        ev(challenger={"latency_p99": 2.0, "requests": 60}),
        "ramp",
        "inconclusive",
    ),
    ("too_few_requests", ev(challenger={"requests": 12}), "ramp", "inconclusive"),
    (
        "no_champion_requests",
        ev(champion={"requests": 0, "latency_p99": None}),
        "ramp",
        "inconclusive",
    ),
    ("mirror_phase_does_not_apply", ev(challenger={"latency_p99": 9.0}), "mirror", "pass"),
]


@pytest.mark.parametrize(
    ("case", "evidence", "phase", "want"), LATENCY, ids=[c[0] for c in LATENCY]
)
def test_latency_compares_p99_with_the_champion_times_the_ratio(case, evidence, phase, want):
    result = gate_latency(evidence, CFG, phase)
    assert result.status == want, result.detail


SRM = [
    ("ok", ev(), "ramp", "pass"),
    ("mismatch", ev(srm_p_value=1e-6, srm_ok=False), "ramp", "fail"),
    ("mismatch_on_few_units", ev(srm_p_value=0.0, srm_ok=False, srm_units=5), "ramp", "fail"),
    ("ok_on_too_few_units", ev(srm_units=20), "ramp", "inconclusive"),
    ("no_check", ev(srm_p_value=None, srm_ok=None, srm_units=0), "ramp", "inconclusive"),
    ("mirror_phase_does_not_apply", ev(srm_p_value=0.0, srm_ok=False), "mirror", "pass"),
]


@pytest.mark.parametrize(("case", "evidence", "phase", "want"), SRM, ids=[c[0] for c in SRM])
def test_srm_fails_on_its_alarm_and_passes_when_the_split_is_right(case, evidence, phase, want):
    result = gate_srm(evidence, CFG, phase)
    assert result.status == want, result.detail


def test_mirror_phase_gates_say_they_do_not_apply():
    gates = evaluate_gates(ev(srm_ok=False, challenger={"latency_p99": 9.0}), CFG, phase="mirror")
    for name in ("latency", "srm"):
        assert "not applicable in the mirror phase" in gates.result(name).detail
    assert gates.status == "pass"
    assert gates.summary_line().startswith("gates (mirror): pass")


OVERALL = [
    ("all_pass", ev(), "pass"),
    ("one_inconclusive", ev(pairwise_diff=-0.1), "inconclusive"),
    (
        "one_fail_beats_one_inconclusive",
        ev(pairwise_diff=-0.1, challenger={"fallback_rate": 0.4}),
        "fail",
    ),
]


@pytest.mark.parametrize(("case", "evidence", "want"), OVERALL, ids=[c[0] for c in OVERALL])
def test_overall_status_is_fail_then_inconclusive_then_pass(case, evidence, want):
    assert evaluate_gates(evidence, CFG, phase="ramp").status == want


def test_min_samples_setting_moves_every_gate_to_inconclusive():
    gates = evaluate_gates(GOOD, CFG.model_copy(update={"min_samples": 5000}), phase="ramp")
    assert {r.status for r in gates.results} == {"inconclusive"}


def test_summary_line_leads_with_the_failures():
    gates = evaluate_gates(
        ev(pairwise_diff=-0.1, challenger={"fallback_rate": 0.4}), CFG, phase="ramp"
    )
    line = gates.summary_line()
    assert line.startswith("gates (ramp): fail — 4 pass, 1 inconclusive, 1 fail; fallback:")
    assert line.index("fallback:") < line.index("not_worse:")


def test_metrics_are_flat_finite_numbers_and_rows_one_per_gate():
    gates = evaluate_gates(ev(challenger={"pairwise_n": 12}), CFG, phase="ramp")
    metrics = gates.as_metrics()
    assert metrics["gate.status"] == 0.0 and metrics["gate.fallback.status"] == 1.0
    assert metrics["gate.not_worse.n"] == 12.0 and "gate.not_worse.observed" not in metrics
    assert metrics["gate.latency.observed"] == pytest.approx(1.1)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    rows = gates.as_rows()
    assert [r["gate"] for r in rows] == [r.name for r in gates.results]


def test_every_look_names_the_gates_in_the_order_the_controllers_metrics_export():
    for phase in ("mirror", "ramp"):
        gates = evaluate_gates(GOOD, CFG, phase=phase)
        assert tuple(r.name for r in gates.results) == GATE_NAMES
    assert combined_status([]) == "pass"


def test_an_unknown_phase_is_refused():
    for phase in ("canary", "shadow"):  # "shadow": the mirror phase's name before the rename
        with pytest.raises(ValueError, match="phase"):
            evaluate_gates(GOOD, CFG, phase=phase)  # type: ignore[arg-type]


# ---- over real A/B results ----------------------------------------------------------------

ARM_PROFILES = {
    # (win, tie, loss) against the teacher in twentieths, fallback every k-th request, latency
    # scale, divergence noise scale
    "champion": ((1, 17, 2), 7, 1.0, 1.0),
    "good": ((2, 17, 1), 7, 1.0, 1.0),
    "bad": ((1, 9, 10), 3, 3.0, 3.0),
}


def outcome(j: int, profile: tuple[int, int, int]) -> str:
    win, tie, _ = profile
    k = j % 20
    return "win" if k < win else "tie" if k < win + tie else "loss"


def ab_world(challenger: str, tmp_path) -> tuple[Any, list[student_drift.StudentDrift]]:
    """400 users split 50/50 (the recorded share), one request each, every one judged pairwise;
    per-arm shadow divergence from the drift simulator."""
    records, judgments = [], []
    for i in range(400):
        arm = "challenger" if i % 2 else "champion"
        wtl, every, slow, _ = ARM_PROFILES[challenger if arm == "challenger" else "champion"]
        fallback = (i // 2) % every == 0
        records.append(
            TrafficRecord(
                request_id=f"r{i}",
                ts=1000.0 + i,
                endpoint="chat",
                arm=arm,
                served_by="teacher" if fallback else arm,
                status=200,
                latency_s=slow * (0.1 + 0.001 * (i % 97)),
                student_model=f"m-{arm}",
                user_hash=f"u{i}",
            )
        )
        judgments.append(
            StoredJudgment(
                f"r{i}",
                "pairwise",
                arm,
                arm,
                f"m-{arm}",
                "judge",
                "v1",
                1000.0 + i,
                "ok",
                outcome=outcome(i // 2, wtl),
            )
        )
    changes = [AbChange(999.0, 0.5, "s", 0.0, "s", "test")]
    ab = build_ab_summary(records, judgments, changes, Settings(state_dir=tmp_path), "test")
    drift = []
    for arm, seed in (("champion", 1), ("challenger", 2)):
        noise = ARM_PROFILES[challenger if arm == "challenger" else "champion"][3]
        sim = SimStudent().worse(noise)
        items = student_drift.divergences(simulate_records(200, sim, seed=seed))
        drift.append(
            student_drift.student_drift(f"m-{arm}", arm, items, None, "x", DriftSettings())
        )
    return ab, drift


def test_real_ab_results_pass_a_good_challenger(tmp_path):
    ab, drift = ab_world("good", tmp_path)
    evidence = evidence_from(ab, drift)
    assert evidence.challenger.requests == 200 and evidence.challenger.pairwise_n == 200
    assert evidence.srm_ok is True and evidence.pairwise_interval is not None
    gates = evaluate_gates(evidence, CFG, phase="ramp")
    assert gates.status == "pass", gates.summary_line()


def test_real_ab_results_fail_a_clearly_worse_challenger(tmp_path):
    ab, drift = ab_world("bad", tmp_path)
    gates = evaluate_gates(evidence_from(ab, drift), CFG, phase="ramp")
    assert gates.status == "fail"
    failed = {r.name for r in gates.results if r.status == "fail"}
    assert failed == {"not_worse", "win_or_tie", "divergence", "fallback", "latency"}


def test_evidence_takes_the_drift_entry_of_each_arm(tmp_path):
    ab, drift = ab_world("good", tmp_path)
    other = dataclasses.replace(drift[0], arm="unknown", student_model="old")
    evidence = evidence_from(ab, [other, *reversed(drift)])
    by_arm = {d.arm: d.divergence for d in drift}
    assert evidence.champion.divergence_k3 == by_arm["champion"].k3_mean
    assert evidence.challenger.divergence_k3 == by_arm["challenger"].k3_mean
    assert evidence_from(ab, []).challenger.divergence_n == 0
