"""The rollout controller's hands and eyes: what `observe` reads and what `execute` does.

    stillhouse controller        # loop.run_controller with ControllerRuntime.observe / .execute

`observe` reads the registry aliases and the challenger's calibration tags, counts the
challenger's answers in the current step from the traffic log, and looks at the gates
(`gate_check.evaluate_step`: judge, divergence, A/B) when the step is due. `execute` changes
traffic through the gateway's admin API (share, mirror), calibrates against the engine the
gateway started for the challenger, and records promotions and rollbacks (`rollout.promotion`).
Every failure is a `StillhouseError`; the loop logs it and tries again on the next tick.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console

from stillhouse.common.calibration_tags import read_calibration
from stillhouse.common.chat import Messages
from stillhouse.common.config import Settings
from stillhouse.common.errors import StillhouseError
from stillhouse.common.formatting import percent
from stillhouse.common.registry import RegistryClient, VersionInfo
from stillhouse.common.roles import Alias, Role
from stillhouse.common.tracking import RunTracker
from stillhouse.common.traffic import MIRROR, TrafficLogError, TrafficLogReader
from stillhouse.rollout.calibration.job import (
    CalibrationError,
    CalibrationOutcome,
    calibrate_version,
    uncertified_tags,
)
from stillhouse.rollout.calibration.prompts import calibration_prompts
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
    gates_due,
)
from stillhouse.rollout.controller.store import DecisionRow
from stillhouse.rollout.gateway_admin import GatewayAdmin, engine_entry
from stillhouse.rollout.promotion import (
    PromotionRecord,
    controller_actor,
    moved_by_hand_since,
    promote,
    record_challenger_rollback,
)

# While a step stays inconclusive its gates are due on every tick; judging is the expensive
# part, so a new look waits for this much more data (or `REEVALUATE_S`).
REEVALUATE_GROWTH = 1.25
REEVALUATE_S = 600.0


class ChallengerNotServing(StillhouseError):
    """The gateway has not (yet) started an engine for the challenger version."""


@dataclass
class ControllerRuntime:
    settings: Settings
    admin: GatewayAdmin
    registry: RegistryClient
    log: Callable[[str], None]
    console: Console = field(default_factory=lambda: Console(quiet=True))
    clock: Callable[[], float] = time.time
    # Where held-out prompts come from (the CLI may first fill in the demo's prompt files).
    prompts: Callable[[Settings], tuple[list[Messages], list[Messages]]] = calibration_prompts
    _looked: tuple[int | None, float, int, float] | None = None  # version, step start, n, when

    @property
    def tracker(self) -> RunTracker:
        return RunTracker(self.registry, self.settings.mlflow.experiment)

    # -- observe -------------------------------------------------------------------------------

    def observe(self, state: ControllerState) -> Observation:
        now = self.clock()
        challenger = self.registry.get_alias(Alias.CHALLENGER)
        champion = self.registry.get_alias(Alias.CHAMPION)
        calibration = None
        if state.phase == Phase.CALIBRATING and challenger is not None:
            calibration = self._calibration(challenger)
        samples = 0
        gates = None
        if state.phase in (Phase.MIRROR, Phase.RAMP) and state.version is not None:
            samples = self.count_samples(state)
            if gates_due(state, now, samples, self.settings.rollout.controller):
                gates = self._gates(state, samples, now)
        ab = self.admin.ab()
        return Observation(
            now,
            challenger.version if challenger else None,
            champion.version if champion else None,
            calibration,
            samples,
            gates,
            (float(ab["challenger_share"]), float(ab["mirror_share"])),
        )

    def _calibration(self, version: VersionInfo) -> Calibration | None:
        found, problem = read_calibration(version.tags, self.settings.gateway.confidence)
        if problem is not None:
            self.log(f"version {version.version}: {problem}; calibrating again")
            return None
        return None if found is None else Calibration(found.certified, found.threshold)

    def count_samples(self, state: ControllerState) -> int:
        """The challenger's answers since the step began: mirrored ones in the mirror phase
        (answers no user saw), served ones in a ramp step."""
        assert state.version is not None
        uri = self.registry.version_uri(state.version)
        try:
            with TrafficLogReader(self.settings.traffic_log_path) as reader:
                records = reader.records(since=state.step_started_at, arm=Role.CHALLENGER.value)
        except TrafficLogError:
            return 0  # no traffic logged yet
        mirrored = state.phase == Phase.MIRROR
        return sum(
            r.status < 400 and (r.served_by == MIRROR) == mirrored and r.student_model == uri
            for r in records
        )

    def _gates(self, state: ControllerState, samples: int, now: float) -> GateLook | None:
        key = (state.version, state.step_started_at)
        if self._looked is not None and self._looked[:2] == key:
            _, _, n, when = self._looked
            if samples < n * REEVALUATE_GROWTH and now - when < REEVALUATE_S:
                return None
        from stillhouse.rollout.controller.gate_check import evaluate_step

        judge_url, judge_model = self._judge()
        phase = "mirror" if state.phase == Phase.MIRROR else "ramp"
        evaluation = evaluate_step(
            self.settings,
            state.step_started_at,
            judge_base_url=judge_url,
            judge_model=judge_model,
            phase=phase,
        )
        self._looked = (state.version, state.step_started_at, samples, now)
        gates = evaluation.gates
        self.log(f"gates ({phase}, {samples} answers): {gates.summary_line()}")
        return GateLook(gates.status, gates.as_metrics(), gates.summary_line())

    def _judge(self) -> tuple[str, str]:
        judge = self.settings.evaluation.judge
        if judge.base_url is not None:
            return judge.base_url, judge.model
        teacher = engine_entry(self.admin.engines(), Role.TEACHER)
        if teacher is None:
            raise StillhouseError("the gateway lists no teacher engine to judge with")
        return str(teacher["base_url"]), str(teacher["served_name"])

    # -- execute -------------------------------------------------------------------------------

    def execute(self, action: ControllerAction) -> None:
        if isinstance(action, SetShare):
            self.admin.set_ab(share=action.share, actor="controller")
        elif isinstance(action, SetMirror):
            self.admin.set_ab(mirror=action.share, actor="controller")
        elif isinstance(action, Calibrate):
            self.calibrate(action.version)
        elif isinstance(action, Promote):
            moved = moved_by_hand_since(self.registry, action.at) if action.at else None
            if moved is not None:  # a replay after an operator's move must not undo it
                self.log(f"not promoting v{action.version} as decided: {moved}, after the decision")
                return
            self.log(self._record(promote, action).summary_line())
            self.admin.refresh()  # the gateway swaps the champion now, not at its next poll
        elif isinstance(action, RollBack):
            self.log(self._record(record_challenger_rollback, action).summary_line())
        elif isinstance(action, Note):
            self.log(action.line)

    def abandon(self, row: DecisionRow, exc: Exception) -> bool:
        """Give up a journaled calibration that has failed for `calibrate_timeout_s` since its
        decision (its engine never comes up): recorded as not certified, with why, so the
        controller rolls the version back. Any other action is retried as long as it takes."""
        action = row.to_action()
        waited = time.time() - row.ts
        if not isinstance(action, Calibrate):
            return False
        if waited < self.settings.rollout.controller.calibrate_timeout_s:
            return False
        reason = f"calibration could not run for {waited:.0f} s: {exc}"
        self.registry.set_version_tags(action.version, uncertified_tags(self.settings, reason))
        self.log(f"version {action.version}: {reason}; recorded as not certified (rolled back)")
        return True

    def _record(
        self, record: Callable[..., PromotionRecord], action: Promote | RollBack
    ) -> PromotionRecord:
        """Record a promotion or a challenger rollback in the registry and MLflow, as decided."""
        return record(
            self.registry,
            self.tracker,
            action.version,
            actor=controller_actor(action.step),
            reason=action.reason,
            metrics=dict(action.metrics),
            at=action.at,
        )

    def calibrate(self, version: int) -> None:
        """Calibrate `version` on the engine the gateway serves it with (it must be up)."""
        info = self.registry.resolve_version(version)
        found, _ = read_calibration(info.tags, self.settings.gateway.confidence)
        if found is not None:
            self.log(f"version {version} is already calibrated (threshold {found.threshold:.4f})")
            return
        engines = self.admin.engines()
        challenger = engine_entry(engines, Role.CHALLENGER)
        teacher = engine_entry(engines, Role.TEACHER)
        if challenger is None or challenger.get("model") != info.uri or teacher is None:
            self.admin.refresh()
            raise ChallengerNotServing(
                f"waiting for the gateway to serve version {version} as the challenger"
            )
        prompts, test_prompts = self.prompts(self.settings)
        self.log(f"calibrating version {version} on {len(prompts)} held-out prompts")
        try:
            outcome = calibrate_version(
                self.settings,
                version,
                student_url=str(challenger["base_url"]),
                student_name=str(challenger["served_name"]),
                teacher_url=str(teacher["base_url"]),
                teacher_name=str(teacher["served_name"]),
                prompts=prompts,
                test_prompts=test_prompts,
                console=self.console,
            )
        except CalibrationError as exc:
            # Retrying cannot help (nothing could be labelled): record it as uncertified so
            # the controller rolls the version back instead of blocking on it forever.
            self.registry.set_version_tags(version, uncertified_tags(self.settings, str(exc)))
            self.log(f"calibration of version {version} failed: {exc}")
            return
        self.log(calibrated_line(outcome))
        self.admin.refresh()  # the gateway picks the new threshold up now


def calibrated_line(outcome: CalibrationOutcome) -> str:
    """The log line of a finished calibration: the threshold and the numbers behind it."""
    result = outcome.result
    fresh = ""
    if outcome.test_share is not None and outcome.test_risk is not None:
        fresh = (
            f"; on {outcome.test_n} fresh prompts: share {percent(outcome.test_share, 0)}, "
            f"unacceptable {outcome.test_risk:.3f}"
        )
    return (
        f"version {outcome.version} calibrated on {result.n} prompts: threshold "
        f"{result.threshold:.4f}, certified {str(result.certified).lower()}, student share "
        f"{percent(result.student_share, 0)}, unacceptable {result.risk_hat:.3f} (≤ "
        f"{result.risk_upper:.3f} at 1−δ; ε {result.epsilon:g}), APGR "
        f"{outcome.apgr.router:.3f}{fresh}"
    )
