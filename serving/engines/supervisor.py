"""Supervision of the vLLM servers `stillhouse serve` started: a server that dies is restarted.

    supervisor = EngineSupervisor(pool, router, metrics, settings.engine)
    await supervisor.start()          # with the app (install_watcher); stop() with it too
    supervisor.status(entry.key)      # for /admin/engines: running | restarting | failed

While a server is down its role's circuit breaker keeps the gateway on the teacher (a probe
finds the port closed at once). The restart reaps what is left of the dead server's process
group, starts it again on the same port (the engine's URL does not change), and waits until it
answers; only then is the role's breaker reset, so traffic returns at once and not after the
next probe. Tries back off (`restart_backoff_s`, doubled, up to `restart_backoff_max_s`), and
after `restart_max_attempts` failed tries in a row the server is reported failed and left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from stillhouse.common.config import EngineSettings
from stillhouse.common.errors import EngineStartError
from stillhouse.serving.engines.pool import EnginePool, PoolEntry, PoolKey
from stillhouse.serving.gateway.metrics import GatewayMetrics
from stillhouse.serving.gateway.router import Router

log = logging.getLogger("stillhouse.supervisor")


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """The wait before restart try `attempt` (1, 2, ...): doubled each time, capped."""
    return min(cap_s, base_s * 2 ** (attempt - 1))


@dataclass
class ProcessStatus:
    """What /admin/engines says of one server's process."""

    state: str = "running"  # running | restarting | failed
    restarts: int = 0  # successful restarts so far
    attempts: int = 0  # tries of the restart under way (or the last one)
    last_exit: int | None = None
    down_since: float | None = None  # wall clock
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "restarts": self.restarts,
            "attempts": self.attempts,
            "last_exit": self.last_exit,
            "down_since": self.down_since,
            "last_error": self.last_error,
        }


class EngineSupervisor:
    def __init__(
        self,
        pool: EnginePool,
        router: Router,
        metrics: GatewayMetrics,
        settings: EngineSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.router = router
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self.statuses: dict[PoolKey, ProcessStatus] = {}
        self._restarts: dict[PoolKey, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(thread_name_prefix="engine-restart")

    def status(self, key: PoolKey) -> ProcessStatus:
        """The server's status (running, for one not looked at yet)."""
        return self.statuses.get(key) or ProcessStatus()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="engine-supervisor")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._restarts.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # A restart still starting a server is not waited for: the pool's close stops it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.supervise_interval_s)
            self.check()

    def check(self) -> None:
        """Start a restart for every running server whose process has ended."""
        for entry in self.pool.entries():
            status = self.statuses.setdefault(entry.key, ProcessStatus())
            if status.state != "running" or entry.key in self._restarts:
                continue
            code = entry.engine.returncode
            if code is None:
                continue
            task = asyncio.create_task(self._restart(entry, status, code))
            self._restarts[entry.key] = task
            task.add_done_callback(lambda _, key=entry.key: self._restarts.pop(key, None))

    def _roles(self, entry: PoolEntry) -> list[str]:
        return [str(r) for r, e in self.router.engines.items() if e.base_url == entry.base_url]

    async def _restart(self, entry: PoolEntry, status: ProcessStatus, code: int) -> None:
        roles = self._roles(entry) or [entry.served_name]
        status.state, status.last_exit, status.down_since = "restarting", code, time.time()
        status.attempts, status.last_error = 0, None
        for role in roles:
            self.metrics.engine_process_up.labels(role).set(0)
        log.warning(
            "the vLLM server of %s (%s) exited with code %s; restarting it on the same port",
            "/".join(roles),
            entry.base_url,
            code,
        )
        s = self.settings
        started = self.clock()
        while status.attempts < s.restart_max_attempts:
            status.attempts += 1
            await asyncio.sleep(
                backoff_s(status.attempts, s.restart_backoff_s, s.restart_backoff_max_s)
            )
            if self.pool.get(entry.key) is not entry:  # swapped away or shutting down meanwhile
                return
            log.info("restarting the vLLM server of %s: try %d", "/".join(roles), status.attempts)
            try:
                # Its own threads: the loop's default executor serves short jobs, and a
                # restart blocks for minutes.
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, _start_again, entry
                )
            except EngineStartError as exc:
                status.last_error = str(exc).splitlines()[0]
                continue
            except Exception as exc:  # a bug: reported, and the next try still comes
                log.exception("restarting the vLLM server of %s failed", "/".join(roles))
                status.last_error = f"{type(exc).__name__}: {exc}"
                continue
            self._serving_again(entry, status, roles, self.clock() - started)
            return
        status.state = "failed"
        for role in roles:
            self.metrics.engine_restarts.labels(role, "failed").inc()
        log.error(
            "gave up restarting the vLLM server of %s after %d tries: %s; the teacher answers "
            "for it until the gateway is restarted",
            "/".join(roles),
            status.attempts,
            status.last_error,
        )

    def _serving_again(
        self, entry: PoolEntry, status: ProcessStatus, roles: list[str], took_s: float
    ) -> None:
        status.state, status.restarts, status.down_since = "running", status.restarts + 1, None
        for role, engine in self.router.engines.items():
            if engine.base_url == entry.base_url:
                engine.breaker.reset()  # ready now: traffic returns without waiting for a probe
                self.metrics.export_breaker(role, engine.breaker.current_state())
        for role in roles:
            self.metrics.engine_process_up.labels(role).set(1)
            self.metrics.engine_restarts.labels(role, "ok").inc()
        log.warning(
            "the vLLM server of %s is serving again after %.0f s (%d tries)",
            "/".join(roles),
            took_s,
            status.attempts,
        )


def _start_again(entry: PoolEntry) -> None:
    """Blocking: reap what is left of the dead server's group, start it, wait until ready."""
    engine = entry.engine
    engine.stop()
    engine.start(append_log=True)
    engine.wait_ready()
