"""The engines' admin API, for `stillhouse serve` (whose model watcher does hot swaps).

    GET  /admin/engines            each role's engine: URL, model version, threshold and its
                                   source, in-flight requests, a swap in progress, the last
                                   swap and the last error; admin key
    POST /admin/engines/refresh    poll the registry now (the rollout controller calls it after
                                   moving an alias); {"wait": true} answers once that poll and
                                   any swap it started are done (minutes when a server starts)

The watcher itself is `serving/engines/watcher.py`; `install_watcher` ties it to the app's
lifetime.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from stillhouse.common.roles import ROLES, Role
from stillhouse.serving.engines.registry_view import RegistryCache
from stillhouse.serving.engines.supervisor import EngineSupervisor
from stillhouse.serving.engines.watcher import ModelWatcher
from stillhouse.serving.gateway.app import json_response
from stillhouse.serving.gateway.auth import authorize_admin
from stillhouse.serving.gateway.errors import InvalidRequest
from stillhouse.serving.gateway.requests import decode_json

WATCHER = web.AppKey("watcher", ModelWatcher)
SUPERVISOR = web.AppKey("supervisor", EngineSupervisor)
REGISTRY = web.AppKey("registry", RegistryCache)


def install_watcher(
    app: web.Application,
    watcher: ModelWatcher,
    supervisor: EngineSupervisor | None = None,
    registry: RegistryCache | None = None,
) -> None:
    """Run `watcher` (and `supervisor`, which restarts a dead server) for the app's lifetime
    and serve their admin routes; `registry` is the cache whose fallbacks they show."""
    app[WATCHER] = watcher
    if supervisor is not None:
        app[SUPERVISOR] = supervisor
    if registry is not None:
        app[REGISTRY] = registry

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await watcher.start()
        if supervisor is not None:
            await supervisor.start()
        try:
            yield
        finally:
            if supervisor is not None:
                await supervisor.stop()
            await watcher.stop()

    app.cleanup_ctx.append(lifetime)  # after build_app's: started after it, stopped before
    app.router.add_get("/admin/engines", admin_engines)
    app.router.add_post("/admin/engines/refresh", admin_refresh)


def engines_state(
    watcher: ModelWatcher,
    supervisor: EngineSupervisor | None = None,
    registry: RegistryCache | None = None,
) -> dict[str, Any]:
    now = watcher.clock()
    engines: dict[str, Any] = {}
    by_url = {entry.base_url: entry for entry in watcher.pool.entries()}
    for role in ROLES:
        engine = watcher.router.engines.get(role)
        state = watcher.roles.get(role)
        if engine is None and state is None:
            continue
        item: dict[str, Any] = {"active": engine is not None}
        if engine is not None:
            item.update(
                base_url=engine.base_url,
                served_name=engine.served_name,
                model=engine.ref,
                in_flight=engine.in_flight,
                circuit=engine.breaker.current_state(),
            )
            if role != Role.TEACHER:
                item.update(
                    threshold=engine.policy.threshold, threshold_source=engine.threshold_source
                )
            managed = by_url.get(engine.base_url)
            if managed is not None:  # a server this gateway started: its process, truly
                status = supervisor.status(managed.key) if supervisor is not None else None
                # No process at all (between a restart's stop and start) is not alive.
                alive = managed.engine.pid is not None and managed.engine.returncode is None
                item["process"] = {
                    "pid": managed.engine.pid,
                    "alive": alive,
                    **(status.as_dict() if status is not None else {}),
                }
        if state is not None:
            entry = watcher.pool.get(state.pool_key) if state.pool_key is not None else None
            swapping = None
            if state.swapping_to is not None and state.swap_started is not None:
                swapping = {"to": state.swapping_to, "for_s": round(now - state.swap_started, 1)}
            item.update(
                follows=state.follow,
                hot_swap=state.swappable,
                pid=entry.engine.pid if entry is not None else None,
                swapping=swapping,
                last_swap=state.last_swap,
                last_error=state.last_error,
                retry_in_s=round(max(0.0, state.retry[1] - now), 1) if state.retry else None,
            )
        engines[str(role)] = item  # orjson takes only plain-str keys
    state: dict[str, Any] = {
        "watch_interval_s": watcher.interval_s,
        "last_poll": watcher.last_poll,
        "now": time.time(),
        "engines": engines,
    }
    if registry is not None:  # which references serve the registry's last answer, not its word
        state["registry"] = registry.status()
    return state


async def admin_engines(request: web.Request) -> web.Response:
    authorize_admin(request)
    return json_response(_state(request.app))


async def admin_refresh(request: web.Request) -> web.Response:
    authorize_admin(request)
    raw = await request.read()  # tiny: the app's client_max_size bounds it
    body = decode_json(raw) if raw.strip() else {}
    unknown = sorted(set(body) - {"wait"})
    if unknown:
        raise InvalidRequest(f"unrecognized argument: {unknown[0]}", param=unknown[0])
    wait = body.get("wait", False)
    if not isinstance(wait, bool):
        raise InvalidRequest("'wait' must be true or false", param="wait")
    watcher = request.app[WATCHER]
    await watcher.refresh(wait)
    status = 200 if wait else 202
    return json_response({"refreshed": wait, **_state(request.app)}, status)


def _state(app: web.Application) -> dict[str, Any]:
    return engines_state(app[WATCHER], app.get(SUPERVISOR), app.get(REGISTRY))
