"""The rollout controller's loop: observe → decide → persist → execute, once per tick.

    stillhouse controller        # cli/rollout.py wires observe/execute to ControllerRuntime

`run_controller` holds the single-instance lock for its whole life, resumes from the persisted
state (a `kill -9` mid-ramp resumes at the same step, with the same step start time), first
finishes whatever the previous process journaled but did not run, re-asserts the share and
mirror its state says are set, and then ticks every `cfg.tick_s` seconds. Why a crash at any
point is safe: `store` and docs/rollout.md (Crash safety).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from stillhouse.common.errors import StillhouseError
from stillhouse.common.rollout_settings import ControllerSettings
from stillhouse.rollout.controller.core import (
    ControllerAction,
    ControllerState,
    Note,
    Observation,
    actions_to_restore,
    decide,
    step_label,
)
from stillhouse.rollout.controller.store import ControllerStore, DecisionRow, controller_lock


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def describe(state: ControllerState, cfg: ControllerSettings) -> str:
    """Where the controller stands, in one line for its log."""
    if state.version is None:
        return f"{state.phase} (no rollout under way)"
    started = datetime.fromtimestamp(state.step_started_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"v{state.version} {step_label(state, cfg)} since {started} UTC, "
        f"share {state.share:g}, mirror {state.mirror:g}"
    )


class _Failures:
    """Logs a failing observe/execute as one line per tick; a traceback (for what is not a
    StillhouseError, i.e. likely a bug) only when the failure changes, so a gateway that is down
    for an hour does not fill the log with the same stack."""

    REPEAT_EVERY_S = 60.0  # the same failure again is logged at most this often

    def __init__(self, log: Callable[[str], None], tick_s: float) -> None:
        self.log = log
        self.tick_s = tick_s
        self.last: str | None = None
        self.logged_at = 0.0
        self.repeats = 0

    def failed(self, doing: str, exc: Exception) -> None:
        lines = str(exc).strip().splitlines()
        text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        now = time.monotonic()
        if text == self.last and now - self.logged_at < self.REPEAT_EVERY_S:
            self.repeats += 1
            return
        again = ""
        if text == self.last and self.repeats:
            again = f" (again; {self.repeats + 1} times since the last line)"
        self.log(f"{doing} failed: {text}; retrying every {self.tick_s:g} s{again}")
        if not isinstance(exc, StillhouseError) and text != self.last:
            self.log(traceback.format_exc().rstrip())
        self.last, self.logged_at, self.repeats = text, now, 0

    def ok(self) -> None:
        self.last = None
        self.repeats = 0


Abandon = Callable[[DecisionRow, Exception], bool]


def _flush(
    store: ControllerStore,
    execute: Callable[[ControllerAction], None],
    failures: _Failures,
    abandon: Abandon | None = None,
) -> bool:
    """Run the journal's pending actions in order; stop at the first failure (a later action
    must not overtake an earlier one: an old share would win). True when none is left.
    `abandon(row, exc)` True: that failed action is given up (it can never succeed, and has
    recorded why), so the journal moves on."""
    for row in store.pending():
        try:
            execute(row.to_action())
        except Exception as exc:
            if abandon is None or not _abandoned(abandon, row, exc, failures):
                failures.failed(f"{row.action} (decided at {row.ts:.0f})", exc)
                return False
        store.mark_done(row.id)
    return True


def _abandoned(abandon: Abandon, row: DecisionRow, exc: Exception, failures: _Failures) -> bool:
    try:
        return abandon(row, exc)
    except Exception as during:  # the registry is down too: try again next tick
        failures.failed(f"giving up {row.action}", during)
        return False


def run_controller(
    store: ControllerStore,
    observe: Callable[[ControllerState], Observation],
    execute: Callable[[ControllerAction], None],
    cfg: ControllerSettings,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], object] | None = None,
    stop: threading.Event | None = None,
    log: Callable[[str], None] = _stderr,
    max_ticks: int | None = None,
    on_locked: Callable[[], object] | None = None,
    abandon: Abandon | None = None,
) -> ControllerState:
    """Run until `stop` is set or `max_ticks` ticks passed (None: forever); return the state.

    Each tick: run any pending journaled actions; when none is left, `observe(state)`,
    `decide`, persist the new state with its actions (one transaction), run them. An Exception
    from `observe` or `execute` is logged and the same work is retried next tick (a controller
    must not die because the gateway restarted); KeyboardInterrupt propagates, leaving the
    persisted state to resume from. `sleep` defaults to `stop.wait` (so setting `stop` wakes
    the loop at once), or `time.sleep` without one. A second controller on the same store raises
    ControllerLockedError before touching anything; `on_locked` runs once the lock is held (to
    bind what only one controller may bind, such as its metrics port).
    """
    wait = sleep or (stop.wait if stop is not None else time.sleep)
    with controller_lock(store.dir):
        if on_locked is not None:
            on_locked()
        now = clock()
        loaded = store.load()
        state = loaded or ControllerState()
        log(f"{'resuming' if loaded else 'first start'}: {describe(state, cfg)}")
        # Journaled behind whatever the previous process left pending, so the order holds.
        store.commit(state, actions_to_restore(state), now, reason="restore at start-up")
        failures = _Failures(log, cfg.tick_s)
        ticks = 0
        try:
            while stop is None or not stop.is_set():
                if _flush(store, execute, failures, abandon):
                    state = _tick(store, observe, execute, cfg, state, failures, log, abandon)
                ticks += 1
                if max_ticks is not None and ticks >= max_ticks:
                    break
                wait(cfg.tick_s)
        except KeyboardInterrupt:
            log(f"interrupted; resume with the same command: {describe(state, cfg)}")
            raise
        return state


def _tick(
    store: ControllerStore,
    observe: Callable[[ControllerState], Observation],
    execute: Callable[[ControllerAction], None],
    cfg: ControllerSettings,
    state: ControllerState,
    failures: _Failures,
    log: Callable[[str], None],
    abandon: Abandon | None = None,
) -> ControllerState:
    try:
        obs = observe(state)
    except Exception as exc:
        failures.failed("observe", exc)
        return state
    waiting = store.waiting_request()
    if waiting is not None:
        obs = replace(obs, operator=waiting[1])
    new, actions = decide(state, obs, cfg)
    if new == state and not actions:  # a quiet tick writes nothing
        failures.ok()
        return state
    # before any side effect: see `store`
    store.commit(new, actions, obs.now, taken=waiting[0] if waiting else None)
    for action in actions:
        if isinstance(action, Note):
            log(action.line)
    if _flush(store, execute, failures, abandon):
        failures.ok()
    return new
