"""The vLLM servers `stillhouse serve` started, shared by the roles that use them.

    pool = EnginePool(vllm_factory(settings))
    entry = pool.start(key, EngineSpec(model_dir, "champion"))   # blocking: start + ready
    pool.attach(key)                 # a role uses it
    server = pool.detach(key)        # the last role left: the caller stops `server`
    pool.close()                     # every server, those still starting too

Servers are keyed by what they serve (the model reference and their extra vLLM arguments), so
when the challenger's version is promoted the champion role points at the challenger's running
server instead of starting a second one, and a server stops only once no role uses it. Thread
safe: servers start in worker threads while the gateway's loop routes requests.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stillhouse.common.config import Settings
from stillhouse.common.errors import EngineStartError
from stillhouse.serving.engines.leftovers import EngineNotes
from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine

PoolKey = tuple[str, tuple[str, ...]]  # (model reference, extra vLLM arguments)


class ManagedEngine(Protocol):
    """What the pool needs of a server (a `VllmEngine`; the unit tests' fakes)."""

    log_path: Path

    @property
    def base_url(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...

    def start(self, *, append_log: bool = False) -> None: ...

    def wait_ready(self, timeout_s: float | None = None) -> None: ...

    def stop(self, grace_s: float | None = None) -> None: ...


def engine_notes(settings: Settings) -> EngineNotes:
    """Where the servers this state dir's gateway starts are noted (leftovers.py)."""
    return EngineNotes(settings.state_dir / "engines")


def vllm_factory(settings: Settings) -> Callable[[EngineSpec], ManagedEngine]:
    notes = engine_notes(settings)
    return lambda spec: VllmEngine(spec, settings.engine, settings.logs_dir, notes=notes)


def pool_key(ref: str, extra_args: tuple[str, ...] = ()) -> PoolKey:
    return (ref, tuple(extra_args))


@dataclass
class PoolEntry:
    key: PoolKey
    served_name: str
    engine: ManagedEngine
    users: int = 0

    @property
    def ref(self) -> str:
        return self.key[0]

    @property
    def base_url(self) -> str:
        return self.engine.base_url


class EnginePool:
    def __init__(self, factory: Callable[[EngineSpec], ManagedEngine]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._running: dict[PoolKey, PoolEntry] = {}
        self._starting: list[ManagedEngine] = []
        self._closed = False

    def get(self, key: PoolKey) -> PoolEntry | None:
        with self._lock:
            return self._running.get(key)

    def keys(self) -> set[PoolKey]:
        with self._lock:
            return set(self._running)

    def entries(self) -> list[PoolEntry]:
        """The running servers, a snapshot."""
        with self._lock:
            return list(self._running.values())

    def launch(self, spec: EngineSpec) -> ManagedEngine:
        """Start a server's process (it boots in the background); `finish` waits for it."""
        with self._lock:  # held across the spawn, so close() cannot miss a new process
            if self._closed:
                raise EngineStartError("the gateway is shutting down")
            engine = self._factory(spec)
            engine.start()
            self._starting.append(engine)
        return engine

    def finish(self, key: PoolKey, engine: ManagedEngine, served_name: str) -> PoolEntry:
        """Wait until a launched server is ready and add it to the pool (no users yet).
        Raises `EngineStartError` (the server stopped) if it fails or the pool closes."""
        try:
            engine.wait_ready()
        except BaseException:
            self._forget(engine)
            engine.stop()
            raise
        with self._lock:
            self._forget_locked(engine)
            closed = self._closed
            existing = self._running.get(key)
            if not closed and existing is None:
                entry = PoolEntry(key, served_name, engine)
                self._running[key] = entry
                return entry
        engine.stop()  # not needed after all (shutting down, or a twin got there first)
        if existing is None:
            raise EngineStartError("the gateway is shutting down")
        return existing

    def start(self, key: PoolKey, spec: EngineSpec) -> PoolEntry:
        """Blocking: the running server for `key` (started now unless it already runs)."""
        entry = self.get(key)
        if entry is not None:
            return entry
        return self.finish(key, self.launch(spec), spec.served_model_name)

    def attach(self, key: PoolKey) -> PoolEntry:
        with self._lock:
            entry = self._running[key]
            entry.users += 1
            return entry

    def detach(self, key: PoolKey) -> ManagedEngine | None:
        """One role fewer uses `key`; the server to stop (by the caller) once none does."""
        with self._lock:
            entry = self._running.get(key)
            if entry is None:
                return None
            entry.users -= 1
            if entry.users > 0:
                return None
            del self._running[key]
            return entry.engine

    def abort_starting(self) -> None:
        """Stop servers still booting (their `finish` then raises); for a shutdown."""
        with self._lock:
            self._closed = True
            starting = list(self._starting)
        for engine in starting:
            engine.stop()

    def close(self) -> None:
        """Stop every server, running or starting. Idempotent."""
        with self._lock:
            self._closed = True
            engines = [e.engine for e in self._running.values()] + list(self._starting)
            self._running.clear()
        for engine in engines:
            with contextlib.suppress(Exception):  # stop the rest whatever one of them does
                engine.stop()

    def _forget(self, engine: ManagedEngine) -> None:
        with self._lock:
            self._forget_locked(engine)

    def _forget_locked(self, engine: ManagedEngine) -> None:
        if engine in self._starting:
            self._starting.remove(engine)
