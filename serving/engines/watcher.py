"""Hot swap: `stillhouse serve` follows the registry aliases its student roles were given.

    watcher = ModelWatcher(gateway.router, gateway.metrics, pool, registry, roles, settings)
    await watcher.start()              # polls every `gateway.watch_interval_s`
    await watcher.refresh(wait=True)   # what `POST /admin/engines/refresh` calls

Each poll asks the registry where each alias points (in a worker thread), plans with
`swap_plan.plan` and acts: start or reuse a server, switch routing, drain and stop the old one,
or only retag a threshold. The steps, the back-off and the thresholds: docs/gateway.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stillhouse.common.calibration_tags import calibration_only, serving_threshold
from stillhouse.common.config import ConfidenceSettings, Settings
from stillhouse.common.errors import StillhouseError
from stillhouse.common.registry import RegistryError, VersionInfo, parse_ref
from stillhouse.common.roles import Role
from stillhouse.common.rollout_tags import rolled_back
from stillhouse.serving.engines.model_cache import models_root, prune
from stillhouse.serving.engines.pool import EnginePool, PoolEntry, PoolKey, pool_key
from stillhouse.serving.engines.registry_view import RegistryView
from stillhouse.serving.engines.swap_plan import RoleView, SwapAction, plan, retry_delay
from stillhouse.serving.engines.vllm import EngineSpec
from stillhouse.serving.gateway.metrics import GatewayMetrics
from stillhouse.serving.gateway.router import Router
from stillhouse.serving.gateway.upstream import Engine, new_engine

log = logging.getLogger("stillhouse.watcher")


def not_served(tags: Mapping[str, str] | None, settings: Settings) -> bool:
    """A challenger version no gateway serves: rolled back, and no operator override."""
    return rolled_back(tags) and not settings.gateway.ab.serve_rolled_back


def share_refusal(role: Role, tags: Mapping[str, str] | None, settings: Settings) -> str | None:
    """Why a challenger version may serve no users, or None when it may: a registry version
    needs a threshold certified for it (else it answers every user at the configured one, with
    no risk bound), unless `gateway.ab.serve_uncertified`. Other roles and engines that are no
    registry version (`tags` None: a directory, a `base_url`) are the operator's choice."""
    if role != Role.CHALLENGER or tags is None or settings.gateway.ab.serve_uncertified:
        return None
    value, why = serving_threshold(tags, settings.gateway.confidence)
    if value is not None:
        return None
    return f"no certified threshold ({why}); gateway.ab.serve_uncertified: true overrides"


def threshold_for(
    tags: Mapping[str, str] | None, conf: ConfidenceSettings, version: str
) -> tuple[float | None, str]:
    """(the version's calibrated threshold, or None for the configured one; why)."""
    if tags is None:
        return None, "configured (not a registry version)"
    value, why = serving_threshold(tags, conf)
    if value is None:
        return None, f"configured ({version}: {why})"
    return value, f"calibrated for {version}"


@dataclass
class WatchedRole:
    """A student role, what it follows in the registry, and what it serves now."""

    role: Role
    follow: str | None  # registry reference polled: an alias (swapped) or a fixed version
    swappable: bool  # follows an alias with servers started here
    served_name: str
    extra_args: tuple[str, ...] = ()
    serving: str | None = None  # version served now; None: not routed to
    pool_key: PoolKey | None = None  # its server in the pool; None: not started here
    tags: dict[str, str] | None = None  # calibration tags applied; None: not a registry version
    failures: int = 0
    retry: tuple[str, float] | None = None
    swapping_to: str | None = None
    swap_started: float | None = None  # monotonic
    last_swap: dict[str, Any] | None = None
    last_error: str | None = None


@dataclass
class _Retiring:
    role: Role
    engine: Engine | None
    key: PoolKey | None
    old_ref: str | None
    new_ref: str | None
    started: float
    removal: bool = False


class ModelWatcher:
    """Follows the registry for the student roles; one poll at a time."""

    def __init__(
        self,
        router: Router,
        metrics: GatewayMetrics,
        pool: EnginePool,
        registry: RegistryView,
        roles: Sequence[WatchedRole],
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.pool = pool
        self.registry = registry
        self.roles = {r.role: r for r in roles}
        self.settings = settings
        self.clock = clock
        self.last_poll: dict[str, Any] = {"at": None, "error": None}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._started = 0
        self._finished = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def interval_s(self) -> float:
        return self.settings.gateway.watch_interval_s

    # --- lifetime ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake, self._lock = asyncio.Event(), asyncio.Lock()
        before = self.router.share_in_force
        for role, engine in list(self.router.engines.items()):
            if role in self.roles:
                self._apply_tags(engine, self.roles[role].tags)
        self.router.note_share_in_force(before)
        self._task = asyncio.create_task(self._run(), name="model-watcher")

    async def stop(self) -> None:
        """Stop polling; servers still booting are stopped (the running ones stay: the pool's
        owner stops them after the gateway)."""
        if self._task is not None:
            self._task.cancel()
        await asyncio.to_thread(self.pool.abort_starting)
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, fut in self._waiters:
            fut.cancel()
        self._waiters.clear()

    async def refresh(self, wait: bool) -> None:
        """Poll now; with `wait`, return once a poll that began after this call is done."""
        assert self._wake is not None, "the watcher has not started"
        want = self._started + 1
        self._wake.set()
        if wait:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((want, fut))
            await fut

    async def _run(self) -> None:
        assert self._wake is not None
        immediate = self.interval_s > 0  # a first look at once: aliases move during start-up
        while True:
            if not immediate:
                timeout = self.interval_s if self.interval_s > 0 else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            immediate = False
            self._wake.clear()
            self._started += 1
            try:
                await self.cycle()
            except Exception:
                log.exception("the model watcher's poll failed")
            self._finished += 1
            for want, fut in list(self._waiters):
                if want <= self._finished:
                    self._waiters.remove((want, fut))
                    if not fut.done():
                        fut.set_result(None)

    # --- one poll ---------------------------------------------------------------------------

    async def cycle(self) -> list[SwapAction]:
        """Ask the registry, plan, act; returns the plan."""
        assert self._lock is not None, "the watcher has not started"
        async with self._lock:
            followed = {r: s.follow for r, s in self.roles.items() if s.follow is not None}
            if not followed:
                return []
            answers, errors = await asyncio.to_thread(self._lookup, followed)
            self.last_poll = {"at": time.time(), "error": "; ".join(errors.values()) or None}
            views = [self._view(self.roles[r], info) for r, info in answers.items()]
            actions = plan(views, self.pool.keys(), self.clock())
            await self._apply(actions, answers)
            return actions

    def _lookup(
        self, followed: Mapping[str, str]
    ) -> tuple[dict[str, VersionInfo | None], dict[str, str]]:
        answers: dict[str, VersionInfo | None] = {}
        errors: dict[str, str] = {}
        for role, ref in followed.items():
            try:
                info = self.registry.lookup(ref)
                if (
                    role == Role.CHALLENGER
                    and info is not None
                    and not_served(info.tags, self.settings)
                ):
                    info = None  # its rollout failed: as if the alias were unset (removed)
                answers[role] = info
            except StillhouseError as exc:  # unreachable registry: try again next time
                errors[role] = f"{role}: {exc}"
                log.warning("cannot look up %s for the %s: %s", ref, role, exc)
        return answers, errors

    def _view(self, state: WatchedRole, info: VersionInfo | None) -> RoleView:
        return RoleView(
            role=state.role,
            serving=state.serving,
            wanted=None if info is None else info.uri,
            applied_tags=state.tags or {},
            wanted_tags=calibration_only(info.tags) if info is not None else {},
            swappable=state.swappable,
            extra_args=state.extra_args,
            retry=state.retry,
        )

    async def _apply(
        self, actions: Sequence[SwapAction], answers: Mapping[str, VersionInfo | None]
    ) -> None:
        for action in actions:
            state = self.roles[action.role]
            info = answers.get(action.role)
            if action.kind == "retag" and info is not None:
                state.tags = calibration_only(info.tags)
                engine = self.router.engines.get(action.role)
                if engine is not None:
                    before = self.router.share_in_force
                    self._apply_tags(engine, info.tags)
                    self.router.note_share_in_force(before)
            elif action.kind == "hold" and state.last_error != action.reason:
                log.warning("%s: %s", action.role, action.reason)
                state.last_error = action.reason
        moves = [a for a in actions if a.kind in ("start", "reuse")]
        removals = [a for a in actions if a.kind == "remove"]
        entries = await self._acquire(moves) if moves else {}
        # Every new engine is in the table before any old one is released: a promotion's
        # champion attaches to the challenger's server before the challenger lets go of it.
        retiring = [
            self._switch(a, entries[a.role], answers[a.role]) for a in moves if a.role in entries
        ]
        retiring += [self._remove(a) for a in removals]
        await asyncio.gather(*(self._retire(r) for r in retiring))
        if retiring:
            keep = self.settings.gateway.model_cache_keep
            await asyncio.to_thread(prune, models_root(self.settings), keep, self._in_use())

    async def _acquire(self, moves: Sequence[SwapAction]) -> dict[str, PoolEntry]:
        """The server for each move (started in parallel, once per key); failures noted."""
        by_key: dict[PoolKey, list[SwapAction]] = {}
        for action in moves:
            state = self.roles[action.role]
            assert action.target is not None
            by_key.setdefault(pool_key(action.target, state.extra_args), []).append(action)
            state.swapping_to, state.swap_started = action.target, self.clock()
        keys = list(by_key)
        results = await asyncio.gather(
            *(self._server(k, by_key[k][0]) for k in keys), return_exceptions=True
        )
        entries: dict[str, PoolEntry] = {}
        for key, result in zip(keys, results, strict=True):
            for action in by_key[key]:
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, BaseException):
                    self._start_failed(action, result)
                else:
                    entries[action.role] = result
        return entries

    async def _server(self, key: PoolKey, action: SwapAction) -> PoolEntry:
        running = self.pool.get(key)
        if running is not None:
            return running
        state = self.roles[action.role]
        assert action.target is not None
        log.info("%s: %s; downloading and starting it", action.role, action.reason)
        model_dir = await asyncio.to_thread(self.registry.download, action.target)
        spec = EngineSpec(model_dir, state.served_name, None, state.extra_args)
        entry = await asyncio.to_thread(self.pool.start, key, spec)
        log.info("%s: %s is ready at %s", action.role, action.target, entry.base_url)
        return entry

    def _start_failed(self, action: SwapAction, exc: BaseException) -> None:
        state = self.roles[action.role]
        state.failures += 1
        delay = retry_delay(state.failures)
        assert action.target is not None
        state.retry = (action.target, self.clock() + delay)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        state.last_error = f"starting {action.target} failed: {first}"
        state.swapping_to = state.swap_started = None
        self.metrics.engine_swaps.labels(action.role, "start_failed").inc()
        known = isinstance(exc, StillhouseError | OSError)
        log.error(
            "%s: starting %s failed; still serving %s; next try in %.0f s: %s",
            action.role,
            action.target,
            state.serving,
            delay,
            exc,
            exc_info=None if known else exc,
        )

    def _switch(self, action: SwapAction, entry: PoolEntry, info: VersionInfo | None) -> _Retiring:
        state = self.roles[action.role]
        assert action.target is not None
        self.pool.attach(entry.key)
        engine = new_engine(
            action.role, entry.base_url, entry.served_name, action.target, self.settings.gateway
        )
        tags = info.tags if info is not None else {}
        self._apply_tags(engine, tags)
        old = self.router.swap_engine(action.role, engine)
        started = state.swap_started if state.swap_started is not None else self.clock()
        retiring = _Retiring(
            action.role, old, state.pool_key, state.serving, action.target, started
        )
        log.info(
            "%s: routing switched from %s to %s (%s)",
            action.role,
            state.serving,
            action.target,
            action.kind,
        )
        state.serving, state.pool_key, state.tags = action.target, entry.key, calibration_only(tags)
        state.failures, state.retry, state.last_error = 0, None, None
        return retiring

    def _remove(self, action: SwapAction) -> _Retiring:
        state = self.roles[action.role]
        old = self.router.remove_engine(action.role)
        log.info("%s: no longer routed to (%s)", action.role, action.reason)
        retiring = _Retiring(
            action.role, old, state.pool_key, state.serving, None, self.clock(), removal=True
        )
        state.serving = state.pool_key = state.tags = None
        state.swapping_to = None
        return retiring

    async def _retire(self, r: _Retiring) -> None:
        """Drain the old engine, then stop its server unless another role still uses it."""
        drained = True
        if r.engine is not None:
            drained = await self.router.drain(r.engine, self.settings.gateway.fallback.deadline_s)
            if not drained:
                log.warning(
                    "%s: %d requests still on %s after the drain timeout; stopping it",
                    r.role,
                    r.engine.in_flight,
                    r.old_ref,
                )
        server = self.pool.detach(r.key) if r.key is not None else None
        pid = server.pid if server is not None else None
        if server is not None:
            await asyncio.to_thread(server.stop)
            log.info("%s: stopped the server of %s (pid %s)", r.role, r.old_ref, pid)
        outcome = "removed" if r.removal else ("ok" if drained else "drain_timeout")
        self.metrics.engine_swaps.labels(r.role, outcome).inc()
        state = self.roles[r.role]
        state.last_swap = {
            "from": r.old_ref,
            "to": r.new_ref,
            "outcome": outcome,
            "at": time.time(),
            "seconds": round(self.clock() - r.started, 3),
            "stopped_pid": pid,
        }
        if state.swapping_to == r.new_ref:
            state.swapping_to = state.swap_started = None

    def _in_use(self) -> list[tuple[str, int]]:
        """The registry versions this gateway serves or is starting: their weights stay."""
        refs = [e.ref for e in self.router.engines.values()]
        refs += [s.swapping_to for s in self.roles.values() if s.swapping_to is not None]
        used: list[tuple[str, int]] = []
        for ref in refs:
            with contextlib.suppress(RegistryError):  # a directory or a URL: not cached here
                parsed = parse_ref(ref, self.settings.mlflow.registered_model)
                if parsed.version is not None:
                    used.append((parsed.name, parsed.version))
        return used

    def _apply_tags(self, engine: Engine, tags: Mapping[str, str] | None) -> None:
        """The version's tags on its engine: its threshold, and whether it may serve users."""
        conf = self.settings.gateway.confidence
        engine.set_threshold(*threshold_for(tags, conf, engine.ref))
        refused = share_refusal(engine.role, tags, self.settings)
        if refused is not None and refused != engine.share_refused:
            log.warning("%s %s serves no users: %s", engine.role, engine.ref, refused)
        engine.share_refused = refused
        log.info(
            "%s serves %s with confidence threshold %.4g: %s",
            engine.role,
            engine.ref,
            engine.policy.threshold,
            engine.threshold_source,
        )
