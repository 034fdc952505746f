"""The rollout controller's decision core: a pure state machine over plain data.

    new_state, actions = decide(state, observation, settings.rollout.controller)

The challenger goes idle → calibrating → mirror → ramp 1/n … n/n → promoted, or to rolled_back
from any active phase (the diagram and every rule: docs/rollout.md, The controller). `decide`
does no I/O and reads no clock (the observation carries `now`), so each transition is one row
of the table in tests/unit/test_controller.py. `loop.run_controller` observes, decides, persists
(`store`) and executes; `runtime.ControllerRuntime` observes the gateway and the registry and
executes the actions against them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, ClassVar

from stillhouse.common.formatting import share_percent as pct
from stillhouse.common.rollout_settings import ControllerSettings
from stillhouse.rollout.gate_status import GATE_STATUSES, GateStatus

STATE_SCHEMA = 1


class Phase(StrEnum):
    IDLE = "idle"  # no challenger under rollout
    CALIBRATING = "calibrating"  # waiting for the version's certified fallback threshold
    MIRROR = "mirror"  # answering mirrored copies of requests that no user sees
    RAMP = "ramp"  # serving cfg.steps[step] of traffic
    PROMOTED = "promoted"  # terminal for `version`
    ROLLED_BACK = "rolled_back"  # terminal for `version`


ACTIVE = frozenset({Phase.CALIBRATING, Phase.MIRROR, Phase.RAMP})
# Phase values persisted by earlier versions of the same state schema, and what they are now.
LEGACY_PHASES = {"shadow": Phase.MIRROR}


# -- what the controller sees ----------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The version's calibration result (its version tags), once there is one."""

    certified: bool
    threshold: float | None = None


@dataclass(frozen=True)
class GateLook:
    """One look at the gates over the current step's window, as plain data: the combined
    status, the flat gate numbers, and a one-line summary."""

    status: GateStatus
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)
    summary: str = ""

    def __post_init__(self) -> None:
        if self.status not in GATE_STATUSES:
            raise ValueError(f"gate status must be one of {GATE_STATUSES}, got {self.status!r}")


@dataclass(frozen=True)
class Observation:
    """The world at one tick.

    `challenger_version` is the version the alias points at now; None means no version holds
    it, never "could not look" (an observer that cannot reach the registry raises instead).
    `samples` counts the challenger's answers since `state.step_started_at`: mirrored ones in
    the mirror phase, served ones in ramp. `gates` is None when the gates were not looked at
    this tick; the observer looks only when `gates_due(...)` says so, since judging is
    expensive.
    """

    now: float
    challenger_version: int | None
    champion_version: int | None = None
    calibration: Calibration | None = None
    samples: int = 0
    gates: GateLook | None = None
    # The gateway's (challenger share, mirror share) as it reports them now; None: not read.
    gateway_split: tuple[float, float] | None = None
    # An operator's `stillhouse rollout pause | resume | abort`, taken this tick (the oldest
    # one waiting); None: none waiting.
    operator: OperatorRequest | None = None


OPERATOR_COMMANDS = ("pause", "resume", "abort")


@dataclass(frozen=True)
class OperatorRequest:
    """What an operator asked the controller to do, by hand."""

    command: str  # one of OPERATOR_COMMANDS
    actor: str
    reason: str = ""

    def __post_init__(self) -> None:
        if self.command not in OPERATOR_COMMANDS:
            raise ValueError(f"operator command must be one of {OPERATOR_COMMANDS}")


# -- what the controller does ----------------------------------------------------------------


@dataclass(frozen=True)
class Calibrate:
    """Run calibration for `version` (idempotent: a version already calibrated keeps its tags)."""

    version: int
    kind: ClassVar[str] = "calibrate"


@dataclass(frozen=True)
class SetMirror:
    """Mirror this share of champion-arm requests to the challenger (0: none). Idempotent."""

    share: float
    kind: ClassVar[str] = "set_mirror"


@dataclass(frozen=True)
class SetShare:
    """Serve this share of traffic from the challenger (0: none). Idempotent."""

    share: float
    kind: ClassVar[str] = "set_share"


@dataclass(frozen=True)
class Promote:
    """Make `version` the champion and record why (`promotion.promote`); `at` is the decision
    time (epoch seconds), so a re-execution after a crash records the same decision."""

    version: int
    reason: str
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)
    step: str = ""
    at: float = 0.0
    kind: ClassVar[str] = "promote"


@dataclass(frozen=True)
class RollBack:
    """Record that the challenger `version` was rolled back; aliases stay untouched."""

    version: int
    reason: str
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)
    step: str = ""
    at: float = 0.0
    kind: ClassVar[str] = "rollback"


@dataclass(frozen=True)
class Note:
    """A log line with the numbers behind a transition (persisted, never executed)."""

    line: str
    kind: ClassVar[str] = "note"


ControllerAction = Calibrate | SetMirror | SetShare | Promote | RollBack | Note
_ACTIONS: dict[str, type[ControllerAction]] = {
    a.kind: a for a in (Calibrate, SetMirror, SetShare, Promote, RollBack, Note)
}


def action_to_dict(action: ControllerAction) -> dict[str, Any]:
    data = asdict(action)
    if "metrics" in data:
        data["metrics"] = {str(k): float(v) for k, v in data["metrics"].items()}
    return {"kind": action.kind, **data}


def action_from_dict(data: Mapping[str, Any]) -> ControllerAction:
    fields = dict(data)
    kind = fields.pop("kind")
    if kind not in _ACTIONS:
        raise ValueError(f"unknown action kind {kind!r}")
    return _ACTIONS[kind](**fields)


# -- the state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControllerState:
    """Everything the controller must remember across a restart.

    `share`/`mirror` are the values last set on the gateway, so a restart re-asserts exactly
    them (`actions_to_restore`) even if the configured steps changed meanwhile. `decided` holds
    the versions whose rollout ended (promoted or rolled back): one still holding the alias is
    not tried again; a retry is a new registration.
    """

    phase: Phase = Phase.IDLE
    version: int | None = None
    step: int = 0  # index into cfg.steps while in ramp
    step_started_at: float = 0.0  # wall clock, epoch seconds
    inconclusive_since: float | None = None
    share: float = 0.0
    mirror: float = 0.0
    last_action: str = ""
    reason: str = ""
    decided: frozenset[int] = frozenset()
    # An operator paused the rollout: nothing moves, and a share they set by hand stands.
    paused: bool = False

    def to_json(self) -> str:
        data = {"schema": STATE_SCHEMA, **asdict(self), "decided": sorted(self.decided)}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ControllerState:
        data = json.loads(text)
        if data.pop("schema", None) != STATE_SCHEMA:
            raise ValueError(f"controller state schema is not {STATE_SCHEMA}")
        data["phase"] = LEGACY_PHASES.get(data["phase"]) or Phase(data["phase"])
        data["decided"] = frozenset(int(v) for v in data["decided"])
        return cls(**data)


def step_label(state: ControllerState, cfg: ControllerSettings) -> str:
    """Where the rollout stands, as recorded in notes and tags: "mirror", "ramp-2/4"."""
    if state.phase is Phase.RAMP:
        return f"ramp-{state.step + 1}/{len(cfg.steps)}"
    if state.phase is Phase.CALIBRATING:
        return "calibration"
    return str(state.phase)


def ramp_share(cfg: ControllerSettings, step: int) -> float:
    # Clamped: the configured steps may have been shortened while a rollout was under way.
    return cfg.steps[min(step, len(cfg.steps) - 1)]


def min_samples(state: ControllerState, cfg: ControllerSettings) -> int:
    return cfg.mirror_min_samples if state.phase is Phase.MIRROR else cfg.min_step_samples


def gates_due(state: ControllerState, now: float, samples: int, cfg: ControllerSettings) -> bool:
    """Whether the current step has held long enough, with enough samples, to be judged."""
    if state.phase not in (Phase.MIRROR, Phase.RAMP):
        return False
    return samples >= min_samples(state, cfg) and now - state.step_started_at >= cfg.min_step_s


def actions_to_restore(state: ControllerState) -> list[ControllerAction]:
    """What a (re)starting controller asserts before anything else: the share and mirror its
    state says are set. After a kill -9 between persisting a decision and executing it, this
    (with the journal's pending actions) brings the gateway back in line; both are idempotent.
    Mirror first when serving (so mirrored traffic stops before the share rises), share first
    otherwise (so served traffic stops before anything else)."""
    if state.share > 0:
        return [SetMirror(state.mirror), SetShare(state.share)]
    return [SetShare(state.share), SetMirror(state.mirror)]


# -- the transitions -------------------------------------------------------------------------


def _with_summary(text: str, summary: str) -> str:
    return f"{text} ({summary})" if summary else text


def decide(
    state: ControllerState, obs: Observation, cfg: ControllerSettings
) -> tuple[ControllerState, list[ControllerAction]]:
    """The next state and the actions to execute, in order. No transition, no actions.

    A gateway whose split differs from the state's (it restarted and fell back to its config)
    gets the state's split again, unless this tick sets it anyway. An operator's request comes
    first; while paused nothing else happens (not even that repair)."""
    if obs.operator is not None:
        return _by_operator(state, obs, cfg, obs.operator)
    if state.paused:
        return state, []
    new_state, actions = _transition(state, obs, cfg)
    split = obs.gateway_split
    if split is None or any(isinstance(a, SetShare | SetMirror) for a in actions):
        return new_state, actions
    want = {SetShare: new_state.share, SetMirror: new_state.mirror}
    have = {SetShare: split[0], SetMirror: split[1]}
    fixes = [a for a in actions_to_restore(new_state) if abs(have[type(a)] - want[type(a)]) > 1e-9]
    if not fixes:
        return new_state, actions
    note = Note(
        f"the gateway runs share {pct(split[0])}, mirror {pct(split[1])}, not the "
        f"controller's {pct(new_state.share)}, {pct(new_state.mirror)} (restarted?): set again"
    )
    return new_state, [note, *fixes, *actions]


def _transition(
    state: ControllerState, obs: Observation, cfg: ControllerSettings
) -> tuple[ControllerState, list[ControllerAction]]:
    ch = obs.challenger_version
    actions: list[ControllerAction] = []
    if state.phase in ACTIVE and ch != state.version:
        if ch is None:
            return _stopped(state, cfg)
        # The weekly job registered a newer challenger: the old one is ended, and recorded.
        state, actions = _roll_back(state, obs, cfg, f"superseded by version {ch}", {})
    if state.phase not in ACTIVE:
        if ch is None or ch in state.decided:
            return state, actions
        return _start(state, obs, actions)
    if state.phase is Phase.CALIBRATING:
        return _after_calibration(state, obs, cfg)
    if obs.gates is None or not gates_due(state, obs.now, obs.samples, cfg):
        return state, []
    if obs.gates.status == "pass":
        return _advance(state, obs, cfg)
    label = step_label(state, cfg)
    metrics = dict(obs.gates.metrics)
    if obs.gates.status == "fail":
        reason = f"gates failed at {label} after {obs.samples} samples"
        return _roll_back(state, obs, cfg, _with_summary(reason, obs.gates.summary), metrics)
    if state.inconclusive_since is None:
        line = _with_summary(
            f"v{state.version} {label} inconclusive after {obs.samples} samples",
            obs.gates.summary,
        )
        held = replace(state, inconclusive_since=obs.now)
        return held, [Note(f"{line}; holding up to {cfg.max_inconclusive_s:g} s")]
    held_s = obs.now - state.inconclusive_since
    if held_s < cfg.max_inconclusive_s:
        return state, []
    reason = (
        f"gates inconclusive at {label} for {held_s:.0f} s "
        f"(limit {cfg.max_inconclusive_s:g} s, {obs.samples} samples)"
    )
    return _roll_back(state, obs, cfg, _with_summary(reason, obs.gates.summary), metrics)


def _start(
    state: ControllerState, obs: Observation, actions: list[ControllerAction]
) -> tuple[ControllerState, list[ControllerAction]]:
    v = obs.challenger_version
    assert v is not None
    new = replace(
        state,
        phase=Phase.CALIBRATING,
        version=v,
        step=0,
        step_started_at=obs.now,
        inconclusive_since=None,
        last_action="calibrate",
        reason=f"new challenger v{v}",
    )
    champion = f"v{obs.champion_version}" if obs.champion_version is not None else "none"
    note = Note(f"v{v}: new challenger (champion {champion}); calibrating its fallback threshold")
    return new, [*actions, Calibrate(v), note]


def _after_calibration(
    state: ControllerState, obs: Observation, cfg: ControllerSettings
) -> tuple[ControllerState, list[ControllerAction]]:
    cal = obs.calibration
    if cal is None:
        return state, []
    threshold = "none" if cal.threshold is None else f"{cal.threshold:.4g}"
    if not cal.certified:
        metrics = {"calibration_certified": 0.0}
        if cal.threshold is not None:
            metrics["calibration_threshold"] = cal.threshold
        reason = f"calibration certified no student share within ε (threshold {threshold})"
        return _roll_back(state, obs, cfg, reason, metrics)
    mirror = cfg.mirror_share
    new = replace(
        state,
        phase=Phase.MIRROR,
        step=0,
        step_started_at=obs.now,
        inconclusive_since=None,
        share=0.0,
        mirror=mirror,
        last_action="mirror",
        reason=f"calibration certified (threshold {threshold})",
    )
    note = Note(
        f"v{state.version} calibration certified (threshold {threshold}); mirror phase: "
        f"{pct(mirror)} of requests mirrored until {cfg.mirror_min_samples} samples and "
        f"{cfg.min_step_s:g} s"
    )
    return new, [SetShare(0.0), SetMirror(mirror), note]


def _advance(
    state: ControllerState, obs: Observation, cfg: ControllerSettings
) -> tuple[ControllerState, list[ControllerAction]]:
    assert obs.gates is not None and state.version is not None
    label = step_label(state, cfg)
    elapsed = obs.now - state.step_started_at
    passed = _with_summary(
        f"{label} passed after {obs.samples} samples in {elapsed:.0f} s", obs.gates.summary
    )
    last = state.phase is Phase.RAMP and state.step >= len(cfg.steps) - 1
    if last:
        new = replace(
            state,
            phase=Phase.PROMOTED,
            inconclusive_since=None,
            share=0.0,
            mirror=0.0,
            last_action="promote",
            reason=passed,
            decided=state.decided | {state.version},
        )
        promote = Promote(state.version, passed, dict(obs.gates.metrics), label, obs.now)
        note = Note(f"v{state.version} {passed}; promoting to champion, share 0")
        # Traffic first: the challenger arm stops before the champion alias moves.
        return new, [SetShare(0.0), SetMirror(0.0), promote, note]
    step = state.step + 1 if state.phase is Phase.RAMP else 0
    share = ramp_share(cfg, step)
    new = replace(
        state,
        phase=Phase.RAMP,
        step=step,
        step_started_at=obs.now,
        inconclusive_since=None,
        share=share,
        mirror=0.0,
        last_action="advance",
        reason=passed,
    )
    nxt = step_label(new, cfg)
    note = Note(f"v{state.version} {passed}; {nxt}: share {pct(state.share)} → {pct(share)}")
    return new, [SetMirror(0.0), SetShare(share), note]


def _roll_back(
    state: ControllerState,
    obs: Observation,
    cfg: ControllerSettings,
    reason: str,
    metrics: dict[str, float],
) -> tuple[ControllerState, list[ControllerAction]]:
    assert state.version is not None
    label = step_label(state, cfg)
    new = replace(
        state,
        phase=Phase.ROLLED_BACK,
        inconclusive_since=None,
        share=0.0,
        mirror=0.0,
        last_action="rollback",
        reason=reason,
        decided=state.decided | {state.version},
    )
    note = Note(
        f"v{state.version} rolled back at {label}: {reason}; share {pct(state.share)} → 0, "
        "aliases untouched"
    )
    # Traffic first: a failing challenger stops serving even if the registry is down.
    return new, [
        SetShare(0.0),
        SetMirror(0.0),
        RollBack(state.version, reason, metrics, label, obs.now),
        note,
    ]


def _by_operator(
    state: ControllerState, obs: Observation, cfg: ControllerSettings, req: OperatorRequest
) -> tuple[ControllerState, list[ControllerAction]]:
    """pause: hold everything as it is; resume: go on, the current step's clock restarted and
    the state's split set again; abort: roll the challenger back now."""
    why = f" ({req.reason})" if req.reason else ""
    where = describe_briefly(state, cfg)
    if req.command == "pause":
        if state.paused:
            return state, [Note(f"pause by {req.actor}{why}: already paused ({where})")]
        paused = replace(state, paused=True, last_action="pause", reason=f"paused by {req.actor}")
        return paused, [
            Note(
                f"paused by {req.actor}{why} at {where}: nothing moves and a share set by hand "
                "stands until `stillhouse rollout resume`"
            )
        ]
    if req.command == "resume":
        if not state.paused:
            return state, [Note(f"resume by {req.actor}{why}: not paused ({where})")]
        resumed = replace(
            state,
            paused=False,
            step_started_at=obs.now,
            inconclusive_since=None,
            last_action="resume",
            reason=f"resumed by {req.actor}",
        )
        note = Note(f"resumed by {req.actor}{why} at {where}; the step's clock starts again")
        return resumed, [note, *actions_to_restore(resumed)]
    unpaused = replace(state, paused=False)
    if state.phase not in ACTIVE:
        return unpaused, [Note(f"abort by {req.actor}{why}: no rollout under way ({where})")]
    return _roll_back(unpaused, obs, cfg, f"aborted by {req.actor}{why}", {})


def describe_briefly(state: ControllerState, cfg: ControllerSettings) -> str:
    if state.version is None:
        return str(state.phase)
    return f"v{state.version} {step_label(state, cfg)}, share {pct(state.share)}"


def _stopped(
    state: ControllerState, cfg: ControllerSettings
) -> tuple[ControllerState, list[ControllerAction]]:
    label = step_label(state, cfg)
    reason = f"challenger alias removed from v{state.version} during {label}"
    new = ControllerState(
        phase=Phase.IDLE, last_action="stop", reason=reason, decided=state.decided
    )
    note = Note(f"{reason} (promoted or rolled back by hand?); stopped: share 0, mirror 0")
    return new, [SetShare(0.0), SetMirror(0.0), note]
