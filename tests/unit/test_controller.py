"""The rollout controller's pure core, table-style: every `decide` transition, when gates are
due, what a restart re-asserts, the state's JSON round trip; then its SQLite store (a decision is
written whole or not at all, the journal, pending actions) and the single-instance lock."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import replace

import pytest

from stillhouse.common.errors import StillhouseError
from stillhouse.common.rollout_settings import ControllerSettings
from stillhouse.rollout.controller.core import (
    Action,
    Calibrate,
    Calibration,
    ControllerState,
    GateResult,
    Note,
    Observation,
    Phase,
    Promote,
    RollBack,
    SetMirror,
    SetShare,
    action_from_dict,
    action_to_dict,
    actions_to_restore,
    decide,
    gates_due,
)
from stillhouse.rollout.controller.store import (
    ControllerLockedError,
    ControllerStore,
    ControllerStoreError,
    controller_lock,
)

CFG = ControllerSettings(
    steps=(0.01, 0.05, 0.25, 0.5),
    shadow_mirror_share=1.0,
    shadow_min_samples=100,
    min_step_samples=200,
    min_step_s=600.0,
    max_inconclusive_s=3600.0,
)
T0 = 1_000_000.0
DUE = T0 + 700.0  # past min_step_s
GATE_NUMBERS = {"win_or_tie": 0.62, "noninferiority_lower": -0.21}
PASS = GateResult("pass", {"win_or_tie": 0.91}, "win-or-tie 0.91 ≥ 0.80")
FAIL = GateResult("fail", GATE_NUMBERS, "win-or-tie 0.62 < 0.80")
INCONCLUSIVE = GateResult("inconclusive", {"win_or_tie": 0.8}, "interval spans the margin")
CERTIFIED = Calibration(True, 0.42)

IDLE = ControllerState()
CAL = ControllerState(Phase.CALIBRATING, 7, step_started_at=T0)
SHADOW = ControllerState(Phase.SHADOW, 7, step_started_at=T0, mirror=1.0)
RAMP1 = ControllerState(Phase.RAMP, 7, 0, T0, share=0.01)
RAMP2 = ControllerState(Phase.RAMP, 7, 1, T0, share=0.05)
RAMP2_HELD = replace(RAMP2, inconclusive_since=T0 + 700.0)
RAMP4 = ControllerState(Phase.RAMP, 7, 3, T0, share=0.5)
RAMP_BEYOND = ControllerState(Phase.RAMP, 7, 5, T0, share=0.5)  # steps were shortened
ROLLED = ControllerState(Phase.ROLLED_BACK, 7, 1, T0, decided=frozenset({7}))
PROMOTED = ControllerState(Phase.PROMOTED, 7, 3, T0, decided=frozenset({7}))


def obs(
    now: float = DUE,
    ch: int | None = 7,
    *,
    cal: Calibration | None = None,
    samples: int = 500,
    gates: GateResult | None = None,
) -> Observation:
    return Observation(now, ch, 3, cal, samples, gates)


def shape(actions: list[Action]) -> list[tuple]:
    """Actions without notes, as comparable tuples (reasons are checked separately)."""
    out: list[tuple] = []
    for a in actions:
        if isinstance(a, SetShare | SetMirror):
            out.append((a.kind, a.share))
        elif isinstance(a, Calibrate):
            out.append((a.kind, a.version))
        elif isinstance(a, Promote | RollBack):
            out.append((a.kind, a.version, a.step))
    return out


OFF = [("set_share", 0.0), ("set_mirror", 0.0)]

# (id, state, observation, phase, version, step, shares (share, mirror), actions, reason part)
TRANSITIONS = [
    ("idle-no-challenger", IDLE, obs(ch=None), Phase.IDLE, None, 0, (0, 0), [], ""),
    ("idle-new-challenger", IDLE, obs(), Phase.CALIBRATING, 7, 0, (0, 0), [("calibrate", 7)],
     "new challenger v7"),
    ("decided-not-retried", ROLLED, obs(), Phase.ROLLED_BACK, 7, 1, (0, 0), [], ""),
    ("promoted-alias-gone", PROMOTED, obs(ch=None), Phase.PROMOTED, 7, 3, (0, 0), [], ""),
    ("after-rollback-new-version", ROLLED, obs(ch=8), Phase.CALIBRATING, 8, 0, (0, 0),
     [("calibrate", 8)], "new challenger v8"),
    ("calibration-pending", CAL, obs(), Phase.CALIBRATING, 7, 0, (0, 0), [], ""),
    ("calibration-certified", CAL, obs(cal=CERTIFIED), Phase.SHADOW, 7, 0, (0, 1.0),
     [("set_share", 0.0), ("set_mirror", 1.0)], "threshold 0.42"),
    ("calibration-not-certified", CAL, obs(cal=Calibration(False)), Phase.ROLLED_BACK, 7, 0,
     (0, 0), [*OFF, ("rollback", 7, "calibration")], "certified no student share within ε"),
    ("shadow-too-few-samples", SHADOW, obs(samples=99, gates=PASS), Phase.SHADOW, 7, 0, (0, 1),
     [], ""),
    ("shadow-too-soon", SHADOW, obs(T0 + 599, gates=PASS), Phase.SHADOW, 7, 0, (0, 1), [], ""),
    ("shadow-due-not-evaluated", SHADOW, obs(), Phase.SHADOW, 7, 0, (0, 1), [], ""),
    ("shadow-pass", SHADOW, obs(samples=100, gates=PASS), Phase.RAMP, 7, 0, (0.01, 0),
     [("set_mirror", 0.0), ("set_share", 0.01)], "shadow passed after 100 samples"),
    ("shadow-fail", SHADOW, obs(gates=FAIL), Phase.ROLLED_BACK, 7, 0, (0, 0),
     [*OFF, ("rollback", 7, "shadow")], "gates failed at shadow after 500 samples"),
    ("ramp-too-few-samples", RAMP1, obs(samples=199, gates=FAIL), Phase.RAMP, 7, 0, (0.01, 0),
     [], ""),
    ("ramp1-pass", RAMP1, obs(gates=PASS), Phase.RAMP, 7, 1, (0.05, 0),
     [("set_mirror", 0.0), ("set_share", 0.05)], "ramp-1/4 passed"),
    ("ramp1-fail", RAMP1, obs(gates=FAIL), Phase.ROLLED_BACK, 7, 0, (0, 0),
     [*OFF, ("rollback", 7, "ramp-1/4")], "gates failed at ramp-1/4 after 500 samples"),
    ("ramp-inconclusive-first", RAMP2, obs(gates=INCONCLUSIVE), Phase.RAMP, 7, 1, (0.05, 0),
     [], ""),
    ("ramp-inconclusive-holding", RAMP2_HELD, obs(T0 + 4299, gates=INCONCLUSIVE), Phase.RAMP,
     7, 1, (0.05, 0), [], ""),
    ("ramp-inconclusive-too-long", RAMP2_HELD, obs(T0 + 4300, gates=INCONCLUSIVE),
     Phase.ROLLED_BACK, 7, 1, (0, 0), [*OFF, ("rollback", 7, "ramp-2/4")],
     "inconclusive at ramp-2/4 for 3600 s"),
    ("held-then-pass", RAMP2_HELD, obs(gates=PASS), Phase.RAMP, 7, 2, (0.25, 0),
     [("set_mirror", 0.0), ("set_share", 0.25)], "ramp-2/4 passed"),
    ("last-step-pass", RAMP4, obs(gates=PASS), Phase.PROMOTED, 7, 3, (0, 0),
     [*OFF, ("promote", 7, "ramp-4/4")], "ramp-4/4 passed"),
    ("step-beyond-shortened-steps", RAMP_BEYOND, obs(gates=PASS), Phase.PROMOTED, 7, 5, (0, 0),
     [*OFF, ("promote", 7, "ramp-6/4")], "passed"),
    ("superseded-mid-ramp", RAMP2, obs(ch=8), Phase.CALIBRATING, 8, 0, (0, 0),
     [*OFF, ("rollback", 7, "ramp-2/4"), ("calibrate", 8)], "new challenger v8"),
    ("alias-removed-mid-ramp", RAMP2, obs(ch=None), Phase.IDLE, None, 0, (0, 0), OFF,
     "alias removed from v7 during ramp-2/4"),
    ("alias-removed-calibrating", CAL, obs(ch=None), Phase.IDLE, None, 0, (0, 0), OFF,
     "during calibration"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("state", "observation", "phase", "version", "step", "shares", "expected", "reason"),
    [pytest.param(*row[1:], id=row[0]) for row in TRANSITIONS],
)
def test_decide_moves_through_each_transition_with_the_right_actions(
    state, observation, phase, version, step, shares, expected, reason
):
    new, actions = decide(state, observation, CFG)
    assert (new.phase, new.version, new.step) == (phase, version, step)
    assert (new.share, new.mirror) == shares
    assert shape(actions) == expected
    assert reason in new.reason
    notes = [a for a in actions if isinstance(a, Note)]
    if new == state:  # a quiet tick says and does nothing
        assert actions == []
    else:
        assert notes, "every transition explains itself"
    if new.phase is not state.phase:
        assert new.inconclusive_since is None


def test_a_step_starts_its_clock_when_entered_and_keeps_it_while_held():
    new, _ = decide(SHADOW, obs(gates=PASS), CFG)
    assert new.step_started_at == DUE
    held, actions = decide(RAMP2, obs(gates=INCONCLUSIVE), CFG)
    assert (held.step_started_at, held.inconclusive_since) == (T0, DUE)
    assert [a.line for a in actions if isinstance(a, Note)] == [
        "v7 ramp-2/4 inconclusive after 500 samples (interval spans the margin); "
        "holding up to 3600 s"
    ]


def test_rollback_and_promote_carry_the_gate_numbers_the_decision_time_and_a_note():
    rolled, actions = decide(RAMP1, obs(gates=FAIL), CFG)
    [rb] = [a for a in actions if isinstance(a, RollBack)]
    assert (rb.version, rb.step, rb.at, dict(rb.metrics)) == (7, "ramp-1/4", DUE, GATE_NUMBERS)
    assert rb.reason == "gates failed at ramp-1/4 after 500 samples (win-or-tie 0.62 < 0.80)"
    [note] = [a.line for a in actions if isinstance(a, Note)]
    assert note.startswith("v7 rolled back at ramp-1/4: gates failed")
    assert "share 1% → 0, aliases untouched" in note
    assert rolled.decided == {7} and rolled.last_action == "rollback"

    promoted, actions = decide(RAMP4, obs(gates=PASS), CFG)
    [pr] = [a for a in actions if isinstance(a, Promote)]
    assert (pr.step, pr.at, dict(pr.metrics)) == ("ramp-4/4", DUE, {"win_or_tie": 0.91})
    assert pr.reason == "ramp-4/4 passed after 500 samples in 700 s (win-or-tie 0.91 ≥ 0.80)"
    assert promoted.decided == {7}


def test_a_superseded_challenger_is_recorded_as_rolled_back_and_never_retried():
    new, actions = decide(RAMP2, obs(ch=8), CFG)
    [rb] = [a for a in actions if isinstance(a, RollBack)]
    assert rb.reason == "superseded by version 8" and rb.version == 7
    assert new.decided == {7}
    back, actions = decide(replace(new, phase=Phase.ROLLED_BACK), obs(ch=7), CFG)
    assert actions == [] and back.version == 8


def test_gate_results_must_be_pass_fail_or_inconclusive():
    with pytest.raises(ValueError, match="gate status"):
        GateResult("passed")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "now", "samples", "due"),
    [
        (CAL, DUE, 10_000, False),
        (SHADOW, T0 + 600, 100, True),
        (SHADOW, T0 + 599.9, 100, False),
        (SHADOW, DUE, 99, False),
        (RAMP1, DUE, 199, False),
        (RAMP1, DUE, 200, True),
        (ROLLED, DUE, 10_000, False),
    ],
)
def test_gates_are_due_only_in_shadow_or_ramp_with_enough_samples_and_time(
    state, now, samples, due
):
    assert gates_due(state, now, samples, CFG) is due


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (IDLE, [SetShare(0.0), SetMirror(0.0)]),
        (CAL, [SetShare(0.0), SetMirror(0.0)]),
        (SHADOW, [SetShare(0.0), SetMirror(1.0)]),
        (RAMP2, [SetMirror(0.0), SetShare(0.05)]),
        (ROLLED, [SetShare(0.0), SetMirror(0.0)]),
    ],
)
def test_a_restart_reasserts_the_share_and_mirror_the_state_says_are_set(state, expected):
    assert actions_to_restore(state) == expected


@pytest.mark.parametrize(
    ("state", "split", "expected"),
    [
        (RAMP2, (0.05, 0.0), []),  # the gateway runs what the state says: nothing to do
        (RAMP2, None, []),  # not read this tick
        (RAMP2, (0.1, 0.0), [SetShare(0.05)]),  # restarted with its configured share
        (SHADOW, (0.0, 0.0), [SetMirror(1.0)]),
        (IDLE, (0.1, 0.3), [SetShare(0.0), SetMirror(0.0)]),
    ],
)
def test_a_gateway_whose_split_drifted_gets_the_states_split_again(state, split, expected):
    obs = Observation(T0 + 10, state.version, gateway_split=split)
    new_state, actions = decide(state, obs, CFG)
    assert new_state == state
    assert [a for a in actions if not isinstance(a, Note)] == expected
    if expected:
        assert isinstance(actions[0], Note) and "restarted?" in actions[0].line


def test_a_tick_that_sets_the_share_itself_is_not_doubled_by_the_reassertion():
    obs = Observation(DUE, 7, samples=500, gates=PASS, gateway_split=(0.3, 0.7))
    new_state, actions = decide(RAMP1, obs, CFG)
    assert new_state.share == 0.05
    assert [a for a in actions if isinstance(a, SetShare)] == [SetShare(0.05)]


def test_state_and_actions_round_trip_through_json():
    state = replace(RAMP2_HELD, decided=frozenset({3, 5}), reason="ramp-1/4 passed ✓")
    assert ControllerState.from_json(state.to_json()) == state
    actions: list[Action] = [
        Calibrate(7),
        SetMirror(1.0),
        SetShare(0.05),
        Promote(7, "ok", {"a": 1.0}, "ramp-4/4", DUE),
        RollBack(7, "bad", GATE_NUMBERS, "ramp-1/4", DUE),
        Note("v7 …"),
    ]
    assert [action_from_dict(action_to_dict(a)) for a in actions] == actions
    with pytest.raises(ValueError, match="schema"):
        ControllerState.from_json('{"phase": "idle"}')


# -- the store -------------------------------------------------------------------------------


def test_the_store_persists_state_and_journals_each_action_with_its_numbers(tmp_path):
    store = ControllerStore.open(tmp_path)
    assert store.load() is None
    assert (tmp_path / "controller.db").is_file()
    rolled, actions = decide(RAMP1, obs(gates=FAIL), CFG)
    store.commit(rolled, actions, DUE)
    assert ControllerStore.open(tmp_path).load() == rolled  # a new process sees it
    rows = store.decisions(7)
    assert [r.action for r in rows] == ["set_share", "set_mirror", "rollback", "note"]
    rb = rows[2]
    assert (rb.ts, rb.version, rb.phase, rb.step) == (DUE, 7, "rolled_back", 0)
    assert rb.metrics == GATE_NUMBERS and rb.reason.startswith("gates failed at ramp-1/4")
    assert rows[0].metrics == {"share": 0.0}
    assert [r.action for r in store.pending()] == ["set_share", "set_mirror", "rollback"]
    assert [r.to_action() for r in store.pending()] == actions[:3]
    store.mark_done(rows[0].id)
    assert [r.action for r in store.pending()] == ["set_mirror", "rollback"]


def test_a_decision_is_written_whole_or_not_at_all(tmp_path):
    store = ControllerStore.open(tmp_path)
    store.commit(RAMP1, [SetShare(0.01)], T0)
    bad = RollBack(7, "x", {"n": "not a number"}, "ramp-1/4", DUE)  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        store.commit(ROLLED, [SetShare(0.0), bad], DUE)
    assert store.load() == RAMP1
    assert [r.action for r in store.decisions()] == ["set_share"]


def test_an_unreadable_state_refuses_to_guess_with_one_line(tmp_path):
    store = ControllerStore.open(tmp_path)
    store.commit(RAMP1, [], T0)
    with sqlite3.connect(store.path) as db:
        db.execute('UPDATE state SET json = \'{"phase": "ramp"\'')
    with pytest.raises(ControllerStoreError) as err:
        store.load()
    assert "unreadable" in str(err.value) and "\n" not in str(err.value)


def test_a_second_controller_is_refused_with_one_line_naming_the_holder(tmp_path):
    with controller_lock(tmp_path) as path:
        assert path.read_text().strip() == str(os.getpid())
        # flock locks belong to the open file, so a second open in this process conflicts too.
        with pytest.raises(ControllerLockedError) as err, controller_lock(tmp_path):
            pass
    message = str(err.value)
    assert f"pid {os.getpid()}" in message and str(path) in message and "\n" not in message
    assert isinstance(err.value, StillhouseError)
    with controller_lock(tmp_path):  # released on exit
        pass
