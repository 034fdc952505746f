"""The rollout controller's pure core, table-style: every `decide` transition, when gates are
due, what a restart re-asserts, the state's JSON round trip; then its SQLite store (a decision is
written whole or not at all, the journal, pending actions) and the single-instance lock."""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import replace
from typing import Any

import pytest

from stillhouse.common.config import load_settings
from stillhouse.common.errors import StillhouseError
from stillhouse.common.rollout_settings import ControllerSettings
from stillhouse.rollout.controller.core import (
    Calibrate,
    Calibration,
    ControllerAction,
    ControllerState,
    GateLook,
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
    mirror_share=1.0,
    mirror_min_samples=100,
    min_step_samples=200,
    min_step_s=600.0,
    max_inconclusive_s=3600.0,
)
T0 = 1_000_000.0
DUE = T0 + 700.0  # past min_step_s
GATE_NUMBERS = {"win_or_tie": 0.62, "noninferiority_lower": -0.21}
PASS = GateLook("pass", {"win_or_tie": 0.91}, "win-or-tie 0.91 ≥ 0.80")
FAIL = GateLook("fail", GATE_NUMBERS, "win-or-tie 0.62 < 0.80")
INCONCLUSIVE = GateLook("inconclusive", {"win_or_tie": 0.8}, "interval spans the margin")
CERTIFIED = Calibration(True, 0.42)

IDLE = ControllerState()
CAL = ControllerState(Phase.CALIBRATING, 7, step_started_at=T0)
MIRROR = ControllerState(Phase.MIRROR, 7, step_started_at=T0, mirror=1.0)
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
    gates: GateLook | None = None,
) -> Observation:
    return Observation(now, ch, 3, cal, samples, gates)


def shape(actions: list[ControllerAction]) -> list[str]:
    """Actions without notes, as short comparable strings (reasons are checked separately)."""
    out: list[str] = []
    for a in actions:
        if isinstance(a, SetShare):
            out.append(f"share {a.share:g}")
        elif isinstance(a, SetMirror):
            out.append(f"mirror {a.share:g}")
        elif isinstance(a, Calibrate):
            out.append(f"calibrate v{a.version}")
        elif isinstance(a, Promote | RollBack):
            out.append(f"{a.kind} v{a.version} at {a.step}")
    return out


OFF = ["share 0", "mirror 0"]


def row(
    case: str,
    state: ControllerState,
    observation: Observation,
    expected: tuple[Phase, int | None, int, float, float],
    actions: list[str],
    reason: str = "",
) -> Any:
    """One transition: from `state`, seeing `observation`, the controller ends in `expected`
    (phase, version, step, share, mirror), doing `actions`, its reason containing `reason`."""
    return pytest.param(state, observation, expected, actions, reason, id=case)


TRANSITIONS = [
    row("idle-no-challenger", IDLE, obs(ch=None), (Phase.IDLE, None, 0, 0, 0), []),
    row(
        "idle-new-challenger",
        IDLE,
        obs(),
        (Phase.CALIBRATING, 7, 0, 0, 0),
        ["calibrate v7"],
        "new challenger v7",
    ),
    row("decided-not-retried", ROLLED, obs(), (Phase.ROLLED_BACK, 7, 1, 0, 0), []),
    row("promoted-alias-gone", PROMOTED, obs(ch=None), (Phase.PROMOTED, 7, 3, 0, 0), []),
    row(
        "after-rollback-new-version",
        ROLLED,
        obs(ch=8),
        (Phase.CALIBRATING, 8, 0, 0, 0),
        ["calibrate v8"],
        "new challenger v8",
    ),
    row("calibration-pending", CAL, obs(), (Phase.CALIBRATING, 7, 0, 0, 0), []),
    row(
        "calibration-certified",
        CAL,
        obs(cal=CERTIFIED),
        (Phase.MIRROR, 7, 0, 0, 1.0),
        ["share 0", "mirror 1"],
        "threshold 0.42",
    ),
    row(
        "calibration-not-certified",
        CAL,
        obs(cal=Calibration(False)),
        (Phase.ROLLED_BACK, 7, 0, 0, 0),
        [*OFF, "rollback v7 at calibration"],
        "certified no student share within ε",
    ),
    row(
        "mirror-too-few-samples",
        MIRROR,
        obs(samples=99, gates=PASS),
        (Phase.MIRROR, 7, 0, 0, 1),
        [],
    ),
    row("mirror-too-soon", MIRROR, obs(T0 + 599, gates=PASS), (Phase.MIRROR, 7, 0, 0, 1), []),
    row("mirror-due-not-evaluated", MIRROR, obs(), (Phase.MIRROR, 7, 0, 0, 1), []),
    row(
        "mirror-pass",
        MIRROR,
        obs(samples=100, gates=PASS),
        (Phase.RAMP, 7, 0, 0.01, 0),
        ["mirror 0", "share 0.01"],
        "mirror passed after 100 samples",
    ),
    row(
        "mirror-fail",
        MIRROR,
        obs(gates=FAIL),
        (Phase.ROLLED_BACK, 7, 0, 0, 0),
        [*OFF, "rollback v7 at mirror"],
        "gates failed at mirror after 500 samples",
    ),
    row(
        "ramp-too-few-samples", RAMP1, obs(samples=199, gates=FAIL), (Phase.RAMP, 7, 0, 0.01, 0), []
    ),
    row(
        "ramp1-pass",
        RAMP1,
        obs(gates=PASS),
        (Phase.RAMP, 7, 1, 0.05, 0),
        ["mirror 0", "share 0.05"],
        "ramp-1/4 passed",
    ),
    row(
        "ramp1-fail",
        RAMP1,
        obs(gates=FAIL),
        (Phase.ROLLED_BACK, 7, 0, 0, 0),
        [*OFF, "rollback v7 at ramp-1/4"],
        "gates failed at ramp-1/4 after 500 samples",
    ),
    row("ramp-inconclusive-first", RAMP2, obs(gates=INCONCLUSIVE), (Phase.RAMP, 7, 1, 0.05, 0), []),
    row(
        "ramp-inconclusive-holding",
        RAMP2_HELD,
        obs(T0 + 4299, gates=INCONCLUSIVE),
        (Phase.RAMP, 7, 1, 0.05, 0),
        [],
    ),
    row(
        "ramp-inconclusive-too-long",
        RAMP2_HELD,
        obs(T0 + 4300, gates=INCONCLUSIVE),
        (Phase.ROLLED_BACK, 7, 1, 0, 0),
        [*OFF, "rollback v7 at ramp-2/4"],
        "inconclusive at ramp-2/4 for 3600 s",
    ),
    row(
        "held-then-pass",
        RAMP2_HELD,
        obs(gates=PASS),
        (Phase.RAMP, 7, 2, 0.25, 0),
        ["mirror 0", "share 0.25"],
        "ramp-2/4 passed",
    ),
    row(
        "last-step-pass",
        RAMP4,
        obs(gates=PASS),
        (Phase.PROMOTED, 7, 3, 0, 0),
        [*OFF, "promote v7 at ramp-4/4"],
        "ramp-4/4 passed",
    ),
    row(
        "step-beyond-shortened-steps",
        RAMP_BEYOND,
        obs(gates=PASS),
        (Phase.PROMOTED, 7, 5, 0, 0),
        [*OFF, "promote v7 at ramp-6/4"],
        "passed",
    ),
    row(
        "superseded-mid-ramp",
        RAMP2,
        obs(ch=8),
        (Phase.CALIBRATING, 8, 0, 0, 0),
        [*OFF, "rollback v7 at ramp-2/4", "calibrate v8"],
        "new challenger v8",
    ),
    row(
        "alias-removed-mid-ramp",
        RAMP2,
        obs(ch=None),
        (Phase.IDLE, None, 0, 0, 0),
        OFF,
        "alias removed from v7 during ramp-2/4",
    ),
    row(
        "alias-removed-calibrating",
        CAL,
        obs(ch=None),
        (Phase.IDLE, None, 0, 0, 0),
        OFF,
        "during calibration",
    ),
]


@pytest.mark.parametrize(("state", "observation", "expected", "actions", "reason"), TRANSITIONS)
def test_decide_moves_through_each_transition_with_the_right_actions(
    state, observation, expected, actions, reason
):
    new, done = decide(state, observation, CFG)
    assert (new.phase, new.version, new.step, new.share, new.mirror) == expected
    assert shape(done) == actions
    assert reason in new.reason
    notes = [a for a in done if isinstance(a, Note)]
    if new == state:  # a quiet tick says and does nothing
        assert done == []
    else:
        assert notes, "every transition explains itself"
    if new.phase is not state.phase:
        assert new.inconclusive_since is None


def test_a_step_starts_its_clock_when_entered_and_keeps_it_while_held():
    new, _ = decide(MIRROR, obs(gates=PASS), CFG)
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
        GateLook("passed")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "now", "samples", "due"),
    [
        (CAL, DUE, 10_000, False),
        (MIRROR, T0 + 600, 100, True),
        (MIRROR, T0 + 599.9, 100, False),
        (MIRROR, DUE, 99, False),
        (RAMP1, DUE, 199, False),
        (RAMP1, DUE, 200, True),
        (ROLLED, DUE, 10_000, False),
    ],
)
def test_gates_are_due_only_in_mirror_or_ramp_with_enough_samples_and_time(
    state, now, samples, due
):
    assert gates_due(state, now, samples, CFG) is due


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (IDLE, [SetShare(0.0), SetMirror(0.0)]),
        (CAL, [SetShare(0.0), SetMirror(0.0)]),
        (MIRROR, [SetShare(0.0), SetMirror(1.0)]),
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
        (MIRROR, (0.0, 0.0), [SetMirror(1.0)]),
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
    actions: list[ControllerAction] = [
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


# A state as the controller wrote it while the mirror phase was still called "shadow".
OLD_MIRROR_STATE = json.dumps(
    {
        "schema": 1,
        "phase": "shadow",
        "version": 7,
        "step": 0,
        "step_started_at": T0,
        "inconclusive_since": None,
        "share": 0.0,
        "mirror": 1.0,
        "last_action": "shadow",
        "reason": "calibration certified (threshold 0.42)",
        "decided": [3],
    }
)


def test_a_state_persisted_before_the_mirror_rename_loads_in_the_mirror_phase():
    state = ControllerState.from_json(OLD_MIRROR_STATE)
    assert state.phase is Phase.MIRROR
    assert state == replace(MIRROR, last_action="shadow", reason=state.reason, decided={3})
    assert json.loads(state.to_json())["phase"] == "mirror"
    # ... and the controller carries on from it as from any mirror phase.
    new, actions = decide(state, obs(samples=100, gates=PASS), CFG)
    assert (new.phase, new.share) == (Phase.RAMP, 0.01)
    assert shape(actions) == ["mirror 0", "share 0.01"]


def test_the_store_loads_a_state_persisted_before_the_mirror_rename(tmp_path):
    store = ControllerStore.open(tmp_path)
    store.commit(MIRROR, [], T0)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE state SET json = ?", (OLD_MIRROR_STATE,))
    loaded = store.load()
    assert loaded is not None and loaded.phase is Phase.MIRROR


def test_the_mirror_settings_still_accept_their_names_from_before_the_rename():
    old = ControllerSettings.model_validate({"shadow_mirror_share": 0.5, "shadow_min_samples": 7})
    new = ControllerSettings(mirror_share=0.5, mirror_min_samples=7)
    assert old == new
    assert (new.mirror_share, new.mirror_min_samples) == (0.5, 7)
    assert "shadow_min_samples" not in new.model_dump()


def test_a_config_file_with_the_old_mirror_keys_still_loads(tmp_path):
    config = tmp_path / "stillhouse.yaml"
    config.write_text(
        "rollout:\n  controller:\n    shadow_mirror_share: 0.25\n    shadow_min_samples: 9\n"
    )
    env = {"STILLHOUSE_ROLLOUT__CONTROLLER__SHADOW_MIN_SAMPLES": "11"}
    cfg = load_settings(config, {}).rollout.controller
    assert (cfg.mirror_share, cfg.mirror_min_samples) == (0.25, 9)
    assert load_settings(None, env).rollout.controller.mirror_min_samples == 11


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


# -- an operator's pause, resume and abort -----------------------------------------------------


def by_operator(command: str, now: float = DUE, **kw: Any) -> Observation:
    from stillhouse.rollout.controller.core import OperatorRequest

    return replace(obs(now, **kw), operator=OperatorRequest(command, "admin:ops", "incident 42"))


def test_a_paused_rollout_holds_and_a_share_set_by_hand_stands():
    paused, actions = decide(RAMP2, by_operator("pause"), CFG)
    assert paused.paused and shape(actions) == []
    assert "paused by admin:ops (incident 42)" in actions[0].line
    # Gates pass and the gateway runs 0 (set by hand): nothing advances, nothing is set again.
    held = replace(by_operator("pause"), operator=None, gates=PASS, gateway_split=(0.0, 0.0))
    assert decide(paused, held, CFG) == (paused, [])


def test_resume_restarts_the_steps_clock_and_sets_the_states_split_again():
    paused = replace(RAMP2_HELD, paused=True)
    resumed, actions = decide(paused, by_operator("resume", now=DUE + 5000), CFG)
    assert not resumed.paused and resumed.step_started_at == DUE + 5000
    assert resumed.inconclusive_since is None
    assert shape(actions) == ["mirror 0", "share 0.05"]


def test_abort_rolls_the_challenger_back_now_with_the_operators_reason():
    aborted, actions = decide(replace(RAMP2, paused=True), by_operator("abort"), CFG)
    assert (aborted.phase, aborted.share, aborted.paused) == (Phase.ROLLED_BACK, 0.0, False)
    assert shape(actions) == [*OFF, "rollback v7 at ramp-2/4"]
    rollback = next(a for a in actions if isinstance(a, RollBack))
    assert rollback.reason == "aborted by admin:ops (incident 42)"


@pytest.mark.parametrize("state,command", [(IDLE, "abort"), (RAMP2, "resume")])
def test_an_operator_request_with_nothing_to_do_is_only_a_note(state, command):
    new, actions = decide(state, by_operator(command), CFG)
    assert new == state and shape(actions) == [] and len(actions) == 1


def test_an_operator_request_is_taken_once_with_the_decision_it_caused(tmp_path):
    from stillhouse.rollout.controller.core import OperatorRequest

    store = ControllerStore.open(tmp_path)
    first = store.request(OperatorRequest("pause", "admin:a"), T0)
    store.request(OperatorRequest("resume", "admin:b"), T0 + 1)
    rid, req = store.waiting_request()
    assert (rid, req.command, req.actor) == (first, "pause", "admin:a")
    store.commit(replace(RAMP2, paused=True), [], T0 + 2, taken=rid)
    assert store.waiting_request()[1].command == "resume"
    with pytest.raises(ValueError, match="operator command"):
        OperatorRequest("restart", "admin:a")
