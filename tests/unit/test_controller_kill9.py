"""The controller loop over a scripted world: in process (a degraded challenger is rolled back at
the first ramp step; failures are retried in order; a restart finishes what was journaled), and
in a subprocess killed with SIGKILL: it resumes at the same step, with the same step start, and
re-asserts its share without ever going back to the mirror phase or an earlier step; and a
promotion it journaled before the kill is not replayed over an operator's rollback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from stillhouse.common.errors import StillhouseError
from stillhouse.common.rollout_settings import ControllerSettings
from stillhouse.rollout.controller.core import (
    Calibration,
    ControllerAction,
    ControllerState,
    GateLook,
    Observation,
    Phase,
    Promote,
    RollBack,
    SetMirror,
    SetShare,
    gates_due,
    step_label,
)
from stillhouse.rollout.controller.loop import run_controller
from stillhouse.rollout.controller.store import (
    ControllerLockedError,
    ControllerStore,
    controller_lock,
)

CFG = ControllerSettings(
    mirror_min_samples=50, min_step_samples=50, min_step_s=120.0, max_inconclusive_s=600.0
)  # tick_s: the default 60 s, on a fake clock
NUMBERS = {"win_or_tie": 0.41, "noninferiority_lower": -0.35}


class World:
    """A fake clock, and a challenger whose gates give the scripted status per step label."""

    def __init__(self, gates: dict[str, str], challenger: int | None = 7) -> None:
        self.t = 1_000_000.0
        self.gates = gates
        self.challenger = challenger
        self.executed: list[ControllerAction] = []
        self.fail_on: Callable[[ControllerAction], bool] = lambda a: False

    def clock(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s

    def observe(self, state: ControllerState) -> Observation:
        samples = 100  # per tick's look: plenty
        gates = None
        if gates_due(state, self.t, samples, CFG):
            status = self.gates.get(step_label(state, CFG), "inconclusive")
            gates = GateLook(status, NUMBERS, f"scripted {status}")  # type: ignore[arg-type]
        return Observation(self.t, self.challenger, 3, Calibration(True, 0.4), samples, gates)

    def execute(self, action: ControllerAction) -> None:
        if self.fail_on(action):
            raise StillhouseError(f"gateway unreachable while doing {action.kind}")
        self.executed.append(action)

    def shares(self) -> list[float]:
        return [a.share for a in self.executed if isinstance(a, SetShare)]


def run(world: World, store: ControllerStore, ticks: int, logs: list[str] | None = None):
    log = logs.append if logs is not None else lambda m: None
    return run_controller(
        store,
        world.observe,
        world.execute,
        CFG,
        clock=world.clock,
        sleep=world.sleep,
        log=log,
        max_ticks=ticks,
    )


def test_a_degraded_challenger_is_rolled_back_at_the_first_step_and_never_serves_more(tmp_path):
    world = World({"mirror": "pass", "ramp-1/4": "fail"})
    store = ControllerStore.open(tmp_path)
    logs: list[str] = []
    state = run(world, store, 12, logs)
    assert (state.phase, state.version, state.step) == (Phase.ROLLED_BACK, 7, 0)
    assert max(world.shares()) == 0.01 and world.shares()[-1] == 0.0
    [rb] = [a for a in world.executed if isinstance(a, RollBack)]
    assert (rb.version, rb.step, dict(rb.metrics)) == (7, "ramp-1/4", NUMBERS)
    assert not any(isinstance(a, Promote) for a in world.executed)
    [row] = [r for r in store.decisions(7) if r.action == "rollback"]
    assert row.metrics == NUMBERS and "gates failed at ramp-1/4" in row.reason
    assert store.pending() == []
    assert any(line.startswith("v7 rolled back at ramp-1/4") for line in logs)


def test_a_healthy_challenger_walks_every_step_in_order_and_is_promoted_once(tmp_path):
    world = World(dict.fromkeys(["mirror", "ramp-1/4", "ramp-2/4", "ramp-3/4", "ramp-4/4"], "pass"))
    state = run(world, ControllerStore.open(tmp_path), 20)
    assert state.phase is Phase.PROMOTED
    assert world.shares() == [0.0, 0.0, 0.01, 0.05, 0.25, 0.5, 0.0]  # restore, mirror, steps, end
    [promote] = [a for a in world.executed if isinstance(a, Promote)]
    assert promote.step == "ramp-4/4"


def test_observe_failures_are_logged_on_one_line_and_retried_next_tick(tmp_path):
    world = World({})
    failures = [
        StillhouseError("gateway down"),
        StillhouseError("gateway down"),
        RuntimeError("bug\nsecond line"),
    ]
    inner = world.observe

    def observe(state: ControllerState) -> Observation:
        if failures:
            raise failures.pop(0)
        return inner(state)

    world.observe = observe  # type: ignore[method-assign]
    logs: list[str] = []
    state = run(world, ControllerStore.open(tmp_path), 4, logs)
    assert state.phase is Phase.CALIBRATING  # the fourth tick got through
    # the same failure twice in a row is one line (until a minute passes)
    assert logs.count("observe failed: StillhouseError: gateway down; retrying every 60 s") == 1
    assert "observe failed: RuntimeError: bug; retrying every 60 s" in logs
    assert sum("Traceback" in line for line in logs) == 1  # only for what looks like a bug


def test_a_failed_action_stays_pending_and_blocks_new_decisions_until_it_runs(tmp_path):
    world = World(dict.fromkeys(["mirror", "ramp-1/4"], "pass"))
    attempts: list[int] = []

    def fail_four_times(a: ControllerAction) -> bool:
        if a == SetShare(0.01):
            attempts.append(1)
            return len(attempts) <= 4
        return False

    world.fail_on = fail_four_times
    store = ControllerStore.open(tmp_path)
    run(world, store, 7, [])
    # Ticks 1-3: calibrate, mirror, hold; 4-7: ramp-1's SetShare(0.01) fails, and although
    # ramp-1's gates are due from tick 6 (they would pass), nothing new is decided meanwhile.
    assert len(attempts) == 4
    assert store.load().step == 0
    assert [r.to_action() for r in store.pending()] == [SetShare(0.01)]
    state = run(world, store, 1, [])  # the pending share first, then the restore, then ramp-2
    assert state.step == 1 and store.pending() == []
    assert world.shares()[-3:] == [0.01, 0.01, 0.05]


def test_a_restart_runs_what_the_dead_process_decided_then_reasserts_its_state(tmp_path):
    store = ControllerStore.open(tmp_path)
    world = World({})
    ramp2 = ControllerState(Phase.RAMP, 7, 1, world.t - 10, share=0.05)  # not due yet
    rb = RollBack(6, "superseded by version 7", {}, "ramp-3/4", world.t - 10)
    store.commit(ramp2, [rb, SetMirror(0.0), SetShare(0.05)], world.t - 10)  # then kill -9
    state = run(world, store, 1)
    assert state == ramp2
    assert world.executed == [rb, SetMirror(0.0), SetShare(0.05), SetMirror(0.0), SetShare(0.05)]
    assert [r.reason for r in store.decisions()][-2:] == ["restore at start-up"] * 2


def test_ctrl_c_ends_the_loop_keeps_the_state_and_releases_the_lock(tmp_path):
    world = World({})
    store = ControllerStore.open(tmp_path)
    run(world, store, 1)

    def interrupted(state: ControllerState) -> Observation:
        raise KeyboardInterrupt

    world.observe = interrupted  # type: ignore[method-assign]
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run(world, store, 5, logs)
    assert store.load().phase is Phase.CALIBRATING
    assert logs[-1].startswith("interrupted; resume with the same command: v7 calibration")
    with controller_lock(tmp_path):
        pass


# -- kill -9 in a real process ---------------------------------------------------------------

CONTROLLER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from stillhouse.common.rollout_settings import ControllerSettings
    from stillhouse.rollout.controller.core import (
        Calibration, GateLook, Observation, action_to_dict, gates_due, step_label)
    from stillhouse.rollout.controller.loop import run_controller
    from stillhouse.rollout.controller.store import ControllerStore

    work = Path(sys.argv[1])
    cfg = ControllerSettings(min_step_s=0, mirror_min_samples=1, min_step_samples=1, tick_s=0.2)

    def world():
        return json.loads((work / "world.json").read_text())

    def observe(state):
        w, now = world(), time.time()
        gates = None
        if gates_due(state, now, w["samples"], cfg):
            status = w["gates"].get(step_label(state, cfg), "inconclusive")
            gates = GateLook(status, {"win_or_tie": 0.9}, status)
        cal = Calibration(True, 0.4)
        return Observation(now, w["challenger"], 3, cal, w["samples"], gates)

    runtime = None
    if world().get("registry"):  # promotions go to a real MLflow registry, through the runtime
        from stillhouse.common.config import Settings
        from stillhouse.common.registry import RegistryClient
        from stillhouse.rollout.controller.runtime import ControllerRuntime

        class NoGateway:
            def refresh(self):
                pass

        settings = Settings(state_dir=Path(world()["registry"]))
        registry = RegistryClient.from_settings(settings)
        runtime = ControllerRuntime(settings, NoGateway(), registry, lambda m: print(m, flush=True))

    def execute(action):
        record = {"pid": os.getpid(), **action_to_dict(action)}
        die_on = world().get("die_on")
        if die_on and all(record.get(k) == v for k, v in die_on.items()):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-decision: journaled, not yet executed
        if runtime is not None and action.kind == "promote":
            runtime.execute(action)
        with open(work / "actions.jsonl", "a") as f:
            f.write(json.dumps(record) + "\\n")

    run_controller(ControllerStore.open(work / "controller"), observe, execute, cfg,
                   log=lambda m: print(m, flush=True))
    """
)
TIMEOUT_S = 30.0


def write_world(work: Path, **world: Any) -> None:
    tmp = work / "world.json.tmp"
    tmp.write_text(json.dumps({"challenger": 7, "samples": 10, **world}))
    os.replace(tmp, work / "world.json")  # the controller never reads half a file


def start(work: Path, name: str) -> subprocess.Popen:
    out = open(work / f"{name}.log", "w")  # noqa: SIM115 (the child owns it)
    try:
        return subprocess.Popen(
            [sys.executable, "-c", CONTROLLER, str(work)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed whole in `stop`
        )
    finally:
        out.close()


def stop(proc: subprocess.Popen) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def wait_for(what: str, check: Callable[[], bool], procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        for p in procs:
            assert p.poll() is None, f"controller {p.pid} exited with {p.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def executed(work: Path, pid: int) -> list[dict[str, Any]]:
    path = work / "actions.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.pop("pid") == pid]


def test_a_kill_9_mid_ramp_resumes_at_the_same_step_and_share(tmp_path):
    store = ControllerStore.open(tmp_path / "controller")
    write_world(tmp_path, gates={"mirror": "pass", "ramp-1/4": "pass"})  # holds at ramp-2/4
    first = start(tmp_path, "first")
    second: subprocess.Popen | None = None
    try:

        def held_at_ramp_2() -> bool:
            s = store.load()
            return s is not None and s.step == 1 and s.inconclusive_since is not None

        wait_for("ramp-2/4, inconclusive", held_at_ramp_2, [first])
        before = store.load()
        assert before is not None and (before.phase, before.share) == (Phase.RAMP, 0.05)
        stop(first)
        assert first.returncode == -signal.SIGKILL
        last_row = store.decisions()[-1].id

        second = start(tmp_path, "second")
        wait_for("the restore", lambda: len(executed(tmp_path, second.pid)) >= 2, [second])
        locked = pytest.raises(ControllerLockedError, match=f"pid {second.pid}")
        with locked, controller_lock(tmp_path / "controller"):  # one controller at a time
            pass
        time.sleep(1.0)  # five ticks of holding
        assert store.load() == before  # same step, same step start, same inconclusive clock
        write_world(tmp_path, gates={"ramp-2/4": "pass"})
        wait_for("ramp-3/4", lambda: store.load().step == 2, [second])
        # The decision is committed before it runs: wait for its actions too, not just the state.
        wait_for("ramp-3/4's actions", lambda: len(executed(tmp_path, second.pid)) >= 4, [second])
    finally:
        stop(first)
        if second is not None:
            stop(second)
    assert executed(tmp_path, second.pid)[:4] == [
        {"kind": "set_mirror", "share": 0.0},  # the restore: what the state says is set
        {"kind": "set_share", "share": 0.05},
        {"kind": "set_mirror", "share": 0.0},  # ramp-2/4 passed
        {"kind": "set_share", "share": 0.25},
    ]
    after = [r for r in store.decisions() if r.id > last_row]
    assert {r.phase for r in after} == {"ramp"} and min(r.step for r in after) == 1
    assert "resuming: v7 ramp-2/4" in (tmp_path / "second.log").read_text()


def test_a_kill_9_between_deciding_and_executing_runs_the_decision_on_restart(tmp_path):
    store = ControllerStore.open(tmp_path / "controller")
    die_on = {"kind": "set_share", "share": 0.05}
    write_world(tmp_path, gates={"mirror": "pass", "ramp-1/4": "pass"}, die_on=die_on)
    first = start(tmp_path, "first")
    second: subprocess.Popen | None = None
    try:
        first.wait(timeout=TIMEOUT_S)  # it kills itself executing SetShare(0.05)
        assert first.returncode == -signal.SIGKILL
        state = store.load()
        assert state is not None and (state.step, state.share) == (1, 0.05)
        assert [r.to_action() for r in store.pending()] == [SetShare(0.05)]
        assert executed(tmp_path, first.pid)[-1] == {"kind": "set_mirror", "share": 0.0}

        write_world(tmp_path, gates={})
        second = start(tmp_path, "second")
        wait_for("the replay", lambda: len(executed(tmp_path, second.pid)) >= 3, [second])
        assert store.pending() == []
        assert store.load().step == 1
    finally:
        stop(first)
        if second is not None:
            stop(second)
    assert executed(tmp_path, second.pid)[:3] == [
        {"kind": "set_share", "share": 0.05},  # the dead process's decision
        {"kind": "set_mirror", "share": 0.0},  # then the restore
        {"kind": "set_share", "share": 0.05},
    ]


def test_a_kill_9_before_a_journaled_promotion_does_not_undo_a_manual_rollback(tmp_path):
    """Case 9: the controller journals "promote v3" and is killed before it runs; an operator
    rolls the champion back with `stillhouse rollback`; the restarted controller replays its
    journal and must not promote over the operator's decision. Real MLflow registry (sqlite),
    real CLI, real controller processes."""
    import yaml

    from stillhouse.common.config import Settings
    from stillhouse.common.registry import RegistryClient
    from stillhouse.common.tracking import RunTracker
    from stillhouse.rollout.promotion import admin_actor, promote

    state = tmp_path / "state"
    settings = Settings(state_dir=state)
    registry = RegistryClient.from_settings(settings)
    experiment = registry.ensure_experiment(settings.mlflow.experiment)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    for i in range(3):
        run_id = client.create_run(experiment).info.run_id
        registry.register_version(run_id, model, {"n": str(i)}, alias=None)
    tracker = RunTracker(registry, settings.mlflow.experiment)
    earlier = time.time() - 120
    promote(registry, tracker, 1, actor=admin_actor("ops"), reason="first", at=earlier)
    promote(registry, tracker, 2, actor=admin_actor("ops"), reason="second", at=earlier + 30)

    store = ControllerStore.open(tmp_path / "controller")
    passed = {"mirror": "pass", **{f"ramp-{i}/4": "pass" for i in range(1, 5)}}
    die_on = {"kind": "promote"}
    write_world(tmp_path, challenger=3, gates=passed, die_on=die_on, registry=str(state))
    first = start(tmp_path, "first")
    second: subprocess.Popen | None = None
    try:
        first.wait(timeout=120)  # it kills itself executing Promote(3)
        assert first.returncode == -signal.SIGKILL
        assert [r.to_action().kind for r in store.pending()] == ["promote"]
        assert registry.get_alias("champion").version == 2  # decided, not done

        config = tmp_path / "stillhouse.yaml"
        config.write_text(yaml.safe_dump({"state_dir": str(state), "demo": {"enabled": False}}))
        rolled = subprocess.run(
            [sys.executable, "-m", "stillhouse", "--config", str(config), "rollback", "--yes"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert registry.get_alias("champion").version == 1

        write_world(tmp_path, challenger=3, gates=passed, registry=str(state))
        second = start(tmp_path, "second")
        wait_for("the replay", lambda: store.pending() == [], [second])
    finally:
        stop(first)
        if second is not None:
            stop(second)
    assert registry.get_alias("champion").version == 1  # the operator's rollback stands
    assert (
        "not promoting v3 as decided: rollback of v2 by admin:"
        in (tmp_path / "second.log").read_text()
    )
