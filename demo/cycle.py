"""One compressed rollout cycle on the demo world: the weekly loop in minutes, not a week.

The rollout controller (the same `ControllerRuntime` as `stillhouse controller`) runs in a
thread against the demo's gateway while steady ticket traffic flows, with compressed settings
(`demo_rollout_settings`): shorter ramp steps and fewer samples per step. Two challengers:

1. this week's student: calibrate → mirror → ramp → promoted; the gateway hot-swaps the
   champion to it under load;
2. a degraded student (trained on shuffled answers), registered as next week's challenger:
   the controller must stop it before it serves more than the first step's share.

Each decision is printed as it is made, with its numbers, and is in MLflow.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console

from stillhouse.common.config import Settings
from stillhouse.common.registry import RegistryClient
from stillhouse.common.traffic import TrafficLogReader
from stillhouse.rollout.controller.core import ControllerState
from stillhouse.rollout.controller.loop import run_controller
from stillhouse.rollout.controller.runtime import ControllerRuntime
from stillhouse.rollout.controller.store import ControllerStore, DecisionRow
from stillhouse.rollout.gateway_admin import GatewayAdmin, engine_entry

DEMO_STEPS = (0.05, 0.25, 0.5)  # production default: 1, 5, 25, 50 %
DEMO_CONTROLLER = {
    "steps": DEMO_STEPS,
    "mirror_min_samples": 60,
    "min_step_samples": 40,
    "min_step_s": 0.0,
    "max_inconclusive_s": 600.0,
    "tick_s": 3.0,
    "judge_sample": 60,
}
# The controller bounds each phase itself (max_inconclusive_s, then a rollback), so the demo
# waits for as long as the controller keeps taking steps: a ramp at 5% of teacher-bound traffic
# can take ten minutes, and a fixed budget cut such a rollout off just before its promotion.
STALL_S = (
    DEMO_CONTROLLER["max_inconclusive_s"] + 300.0
)  # no step this long: the controller is stuck
CYCLE_CAP_S = 3600.0
SWAP_TIMEOUT_S = 600.0


def demo_rollout_settings(settings: Settings) -> Settings:
    """The controller, gates and calibration compressed to minutes of demo traffic."""
    ro = settings.rollout
    return settings.model_copy(
        update={
            "rollout": ro.model_copy(
                update={
                    "controller": ro.controller.model_copy(update=DEMO_CONTROLLER),
                    # Tens of judged answers per look, not hundreds: a wider non-inferiority margin.
                    "gates": ro.gates.model_copy(
                        update={"min_samples": 30, "noninferiority_margin": 0.2}
                    ),
                    "calibration": ro.calibration.model_copy(update={"holdout_size": 200}),
                }
            )
        }
    )


@dataclass(frozen=True)
class CycleOutcome:
    version: int
    phase: str  # promoted / rolled_back / (timeout) the phase it was in
    reason: str
    seconds: float
    max_share: float  # the largest challenger share the controller set for it
    decisions: list[DecisionRow]


class ControllerThread:
    def __init__(self, settings: Settings, admin: GatewayAdmin, say: Callable[[str], None]):
        self.store = ControllerStore.open(settings.controller_dir)
        self.runtime = ControllerRuntime(
            settings,
            admin,
            RegistryClient.from_settings(settings),
            lambda line: say(f"controller: {line}"),
        )
        self.settings = settings
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="controller", daemon=True)

    def _run(self) -> None:
        try:
            run_controller(
                self.store,
                self.runtime.observe,
                self.runtime.execute,
                self.settings.rollout.controller,
                stop=self._stop,
                log=self.runtime.log,
                abandon=self.runtime.abandon,
            )
        except BaseException as exc:  # reported by the demo's main thread
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        # A calibration in flight cannot be interrupted; the thread is a daemon, so a Ctrl-C'd
        # demo does not wait for it (the controller resumes from its journal next time).
        self._thread.join(timeout=15)

    def state(self) -> ControllerState:
        return self.store.load() or ControllerState()


def gave_up(
    now: float,
    started: float,
    last_step: float,
    stall_s: float = STALL_S,
    cap_s: float = CYCLE_CAP_S,
) -> str | None:
    """Why the demo stops waiting for a decision (None: keep waiting). Times are wall clock;
    `last_step` is the newest journal row for the version (or the start)."""
    if now - started >= cap_s:
        return f"undecided after {now - started:.0f} s"
    if now - max(last_step, started) >= stall_s:
        return f"undecided: the controller took no step for {now - max(last_step, started):.0f} s"
    return None


def wait_for_decision(controller: ControllerThread, version: int) -> CycleOutcome:
    started = time.time()
    while True:
        if controller.error is not None:
            raise controller.error
        state = controller.state()
        rows = controller.store.decisions(version)
        if version in state.decided:
            stopped = None
            break
        stopped = gave_up(time.time(), started, max((r.ts for r in rows), default=started))
        if stopped is not None:
            break
        time.sleep(2.0)
    rows = controller.store.decisions(version)
    shares = [
        float(r.payload.get("share", 0.0)) for r in rows if r.action == "set_share" and r.payload
    ]
    final = [r for r in rows if r.action in ("promote", "rollback")]
    if stopped is None and final:
        phase = "promoted" if final[-1].action == "promote" else "rolled_back"
        reason = final[-1].reason
    else:
        phase = f"{stopped or 'undecided'} ({state.phase})"
        reason = state.reason or ""
    return CycleOutcome(
        version, phase, reason, time.time() - started, max(shares, default=0.0), rows
    )


def wait_for_role(
    admin: GatewayAdmin, role: str, uri: str, timeout_s: float = SWAP_TIMEOUT_S
) -> dict:
    """Until the gateway's `role` serves `uri` and no swap is in progress."""
    deadline = time.monotonic() + timeout_s
    admin.refresh()
    while time.monotonic() < deadline:
        entry = engine_entry(admin.engines(), role) or {}
        if entry.get("active") and entry.get("model") == uri and not entry.get("swapping"):
            return entry
        time.sleep(2.0)
    raise TimeoutError(f"the gateway's {role} did not come to serve {uri} in {timeout_s:.0f} s")


def failed_during(settings: Settings, since: float, until: float) -> tuple[int, int]:
    """(requests, failed requests) the gateway logged between the two times."""
    with TrafficLogReader(settings.traffic_log_path) as reader:
        records = [r for r in reader.records(since=since, until=until) if r.served_by != "mirror"]
    return len(records), sum(r.status >= 500 for r in records)


def reset_controller(settings: Settings) -> None:
    """The demo starts a fresh cycle: the previous demo's decisions are forgotten."""
    for name in ("controller.db", "controller.db-wal", "controller.db-shm"):
        (settings.controller_dir / name).unlink(missing_ok=True)


def print_outcome(outcome: CycleOutcome, console: Console) -> None:
    verdict = {"promoted": "[green]promoted[/]", "rolled_back": "[red]rolled back[/]"}
    console.print(
        f"version {outcome.version}: {verdict.get(outcome.phase, outcome.phase)} after "
        f"{outcome.seconds:.0f} s; the largest share it served: {outcome.max_share:.0%}"
    )
    if outcome.reason:
        console.print(f"  reason: {outcome.reason}", markup=False)
    for row in outcome.decisions:
        if row.action in ("promote", "rollback") and row.metrics.get("gate.status") is not None:
            shown = {k: v for k, v in row.metrics.items() if k.endswith((".observed", ".status"))}
            line = ", ".join(f"{k.removeprefix('gate.')} {v:.3g}" for k, v in sorted(shown.items()))
            console.print(f"  gate numbers: {line}", markup=False)
