"""The rollout controller's hands and eyes: what `observe` reads and what `execute` does.

    stillhouse controller        # the loop (controller_loop.run_controller) with these two

`observe` reads the registry aliases and the challenger's calibration tags, counts the
challenger's answers in the current step from the traffic log, and evaluates the gates
(`gate_job.evaluate_step`: judge, divergence, A/B) when the step is due. `execute` changes
traffic through the gateway's admin API (share, mirror), runs calibration against the engine the
gateway started for the challenger, and records promotions and rollbacks in the registry and
MLflow (`promotion`). Every failure is a `StillhouseError`; the loop logs it and tries again on
the next tick, so a restarting gateway or registry never kills the controller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from stillhouse.common.calibration_tags import CalibrationTags, read_calibration
from stillhouse.common.chat import Messages
from stillhouse.common.config import Settings
from stillhouse.common.errors import StillhouseError
from stillhouse.common.registry import RegistryClient, VersionInfo
from stillhouse.common.tracking import RunTracker
from stillhouse.common.traffic import MIRROR, TrafficLogError, TrafficLogReader
from stillhouse.rollout.calibration.job import CalibrationError, calibrate_version
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
    gates_due,
)
from stillhouse.rollout.gateway_admin import GatewayAdmin
from stillhouse.rollout.promotion import controller_actor, promote, record_challenger_rollback

# While a step stays inconclusive its gates are due on every tick; judging is the expensive
# part, so a new look waits for this much more data (or `REEVALUATE_S`).
REEVALUATE_GROWTH = 1.25
REEVALUATE_S = 600.0


class ChallengerNotServing(StillhouseError):
    """The gateway has not (yet) started an engine for the challenger version."""


def calibration_prompts(settings: Settings) -> tuple[list[Messages], list[Messages]]:
    """Held-out prompts to calibrate on, and a fresh split to check the threshold on: the
    configured prompt files (the first `holdout_size` of each), else the newest distinct
    prompts of the traffic log, split alternately."""
    cal = settings.rollout.calibration
    n = cal.holdout_size
    if cal.prompts_file is not None:
        from stillhouse.rollout.distill.data import load_prompt_file

        def chats(path: Path | None) -> list[Messages]:
            return [] if path is None else [r.chat for r in load_prompt_file(path)[:n]]

        return chats(cal.prompts_file), chats(cal.test_prompts_file)
    from stillhouse.rollout.calibration.job import heldout_prompts_from_traffic

    prompts = heldout_prompts_from_traffic(settings, 2 * n)
    return prompts[0::2], prompts[1::2]


def engine_of(engines: dict[str, Any], role: str) -> dict[str, Any] | None:
    listed = engines.get("engines", engines)
    entry = listed.get(role) if isinstance(listed, dict) else None
    return entry if isinstance(entry, dict) else None


@dataclass
class ControllerRuntime:
    settings: Settings
    admin: GatewayAdmin
    registry: RegistryClient
    log: Callable[[str], None]
    console: Console = field(default_factory=lambda: Console(quiet=True))
    clock: Callable[[], float] = time.time
    _looked: tuple[int | None, float, int, float] | None = None  # version, step start, n, when

    @property
    def tracker(self) -> RunTracker:
        return RunTracker(self.registry, self.settings.mlflow.experiment)

    # -- observe -------------------------------------------------------------------------------

    def observe(self, state: ControllerState) -> Observation:
        now = self.clock()
        challenger = self.registry.get_alias("challenger")
        champion = self.registry.get_alias("champion")
        calibration = None
        if state.phase == Phase.CALIBRATING and challenger is not None:
            calibration = self._calibration(challenger)
        samples = 0
        gates = None
        if state.phase in (Phase.SHADOW, Phase.RAMP) and state.version is not None:
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
        """The challenger's answers since the step began: mirrored ones in shadow (answers no
        user saw), served ones in a ramp step."""
        uri = f"models:/{self.settings.mlflow.registered_model}/{state.version}"
        try:
            with TrafficLogReader(self.settings.traffic_log_path) as reader:
                records = reader.records(since=state.step_started_at, arm="challenger")
        except TrafficLogError:
            return 0  # no traffic logged yet
        mirrored = state.phase == Phase.SHADOW
        return sum(
            r.status < 400 and (r.served_by == MIRROR) == mirrored and r.student_model == uri
            for r in records
        )

    def _gates(self, state: ControllerState, samples: int, now: float) -> GateResult | None:
        key = (state.version, state.step_started_at)
        if self._looked is not None and self._looked[:2] == key:
            _, _, n, when = self._looked
            if samples < n * REEVALUATE_GROWTH and now - when < REEVALUATE_S:
                return None
        from stillhouse.rollout.controller.gate_check import evaluate_step

        judge_url, judge_model = self._judge()
        phase = "shadow" if state.phase == Phase.SHADOW else "ramp"
        evaluation = evaluate_step(
            self.settings,
            state.step_started_at,
            judge_base_url=judge_url,
            judge_model=judge_model,
            phase=phase,
        )
        self._looked = (state.version, state.step_started_at, samples, now)
        report = evaluation.report
        self.log(f"gates ({phase}, {samples} answers): {report.summary_line()}")
        return GateResult(report.status, report.as_metrics(), report.summary_line())

    def _judge(self) -> tuple[str, str]:
        judge = self.settings.evaluation.judge
        if judge.base_url is not None:
            return judge.base_url, judge.model
        teacher = engine_of(self.admin.engines(), "teacher")
        if teacher is None:
            raise StillhouseError("the gateway lists no teacher engine to judge with")
        return str(teacher["base_url"]), str(teacher["served_name"])

    # -- execute -------------------------------------------------------------------------------

    def execute(self, action: Action) -> None:
        if isinstance(action, SetShare):
            self.admin.set_ab(share=action.share, actor="controller")
        elif isinstance(action, SetMirror):
            self.admin.set_ab(mirror=action.share, actor="controller")
        elif isinstance(action, Calibrate):
            self.calibrate(action.version)
        elif isinstance(action, Promote):
            record = promote(
                self.registry, self.tracker, action.version,
                actor=controller_actor(action.step), reason=action.reason,
                metrics=dict(action.metrics), at=action.at,
            )  # fmt: skip
            self.log(record.summary_line())
            self.admin.refresh()  # the gateway swaps the champion now, not at its next poll
        elif isinstance(action, RollBack):
            record = record_challenger_rollback(
                self.registry, self.tracker, action.version,
                actor=controller_actor(action.step), reason=action.reason,
                metrics=dict(action.metrics), at=action.at,
            )  # fmt: skip
            self.log(record.summary_line())
        elif isinstance(action, Note):
            self.log(action.line)

    def calibrate(self, version: int) -> None:
        """Calibrate `version` on the engine the gateway serves it with (it must be up)."""
        info = self.registry.resolve(f"models:/{self.settings.mlflow.registered_model}/{version}")
        found, _ = read_calibration(info.tags, self.settings.gateway.confidence)
        if found is not None:
            self.log(f"version {version} is already calibrated (threshold {found.threshold:.4f})")
            return
        engines = self.admin.engines()
        challenger, teacher = engine_of(engines, "challenger"), engine_of(engines, "teacher")
        if challenger is None or challenger.get("model") != info.uri or teacher is None:
            self.admin.refresh()
            raise ChallengerNotServing(
                f"waiting for the gateway to serve version {version} as the challenger"
            )
        prompts, test_prompts = calibration_prompts(self.settings)
        self.log(f"calibrating version {version} on {len(prompts)} held-out prompts")
        try:
            outcome = calibrate_version(
                self.settings, version,
                student_url=str(challenger["base_url"]),
                student_name=str(challenger["served_name"]),
                teacher_url=str(teacher["base_url"]),
                teacher_name=str(teacher["served_name"]),
                prompts=prompts, test_prompts=test_prompts, console=self.console,
            )  # fmt: skip
        except CalibrationError as exc:
            # Retrying cannot help (nothing could be labelled): record it as uncertified so
            # the controller rolls the version back instead of blocking on it forever.
            self.registry.set_version_tags(version, uncertified_tags(self.settings, str(exc)))
            self.log(f"calibration of version {version} failed: {exc}")
            return
        result = outcome.result
        fresh = ""
        if outcome.test_share is not None and outcome.test_risk is not None:
            fresh = (f"; on {outcome.test_n} fresh prompts: share {outcome.test_share:.0%}, "
                     f"unacceptable {outcome.test_risk:.3f}")  # fmt: skip
        self.log(
            f"version {version} calibrated on {result.n} prompts: threshold "
            f"{result.threshold:.4f}, certified {str(result.certified).lower()}, student share "
            f"{result.student_share:.0%}, unacceptable {result.risk_hat:.3f} (≤ "
            f"{result.risk_upper:.3f} at 1−δ; ε {result.epsilon:g}), APGR "
            f"{outcome.apgr.router:.3f}{fresh}"
        )
        self.admin.refresh()  # the gateway picks the new threshold up now


def uncertified_tags(settings: Settings, reason: str) -> dict[str, str]:
    """The tags of a calibration that could label nothing: uncertified, with the reason."""
    from datetime import UTC, datetime

    from stillhouse.common.calibration_tags import CALIBRATION_TAG_PREFIX

    conf, cal = settings.gateway.confidence, settings.rollout.calibration
    tags = CalibrationTags(
        threshold=0.0,
        certified=False,
        signal=conf.signal,
        hold_tokens=conf.hold_tokens,
        quantile=conf.quantile,
        top_k=conf.top_k,
        epsilon=cal.epsilon,
        delta=cal.delta,
        risk=cal.risk,
        n=0,
        student_share=0.0,
        calibrated_at=datetime.now(UTC).isoformat(),
    ).to_tags()
    return {**tags, CALIBRATION_TAG_PREFIX + "error": reason[:500]}
