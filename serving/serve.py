"""`stillhouse serve`: the configured engines and the gateway in front of them, until Ctrl-C.

    stillhouse --config stillhouse.yaml serve     # gateway.engines: teacher, champion, challenger

Each role is a model directory, a registry reference such as
`models:/stillhouse-student@champion` (downloaded once into the state dir's cache, then started
as a vLLM server here), or the `base_url` of an engine already running. A role given as a
registry alias is hot-swapped when the alias moves (`serving/engines/watcher.py`). Ctrl-C or
SIGTERM stops the gateway first (in-flight requests finish), then every engine.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import uvloop
from aiohttp import web
from rich.console import Console

from stillhouse.common.calibration_tags import calibration_only
from stillhouse.common.config import EngineRef, Settings
from stillhouse.common.errors import StillhouseError, UsageError
from stillhouse.common.registry import RegistryError, parse_ref
from stillhouse.common.roles import ROLES, STUDENT_ROLES, Role
from stillhouse.serving.engines.admin import install_watcher
from stillhouse.serving.engines.pool import (
    EnginePool,
    ManagedEngine,
    PoolKey,
    engine_notes,
    pool_key,
    vllm_factory,
)
from stillhouse.serving.engines.registry_view import RegistryCache, RegistryView
from stillhouse.serving.engines.supervisor import EngineSupervisor
from stillhouse.serving.engines.vllm import EngineSpec, engine_fingerprint, validate_model_dir
from stillhouse.serving.engines.watcher import ModelWatcher, WatchedRole, not_served
from stillhouse.serving.gateway.app import GATEWAY, MalformedRequestLog, build_app
from stillhouse.serving.gateway.auth import load_keys
from stillhouse.serving.gateway.parts import EngineEndpoint
from stillhouse.serving.listener import cannot_listen, check_port_free, inherited_listener

log = logging.getLogger("stillhouse.serve")


@dataclass(frozen=True)
class ResolvedEngine:
    role: str  # a `Role` (a config key: the gateway rejects any other)
    ref: str  # what the traffic log records: a registry version URI or a path
    served_name: str
    model_dir: Path | None = None  # start it here
    base_url: str | None = None  # or it is running already
    extra_args: tuple[str, ...] = ()
    watch: str | None = None  # the registry alias this role follows (hot swap)
    tags: Mapping[str, str] | None = None  # its registry version's tags; None: not a version
    tags_ref: str | None = None  # the registry reference its tags are re-read from

    @property
    def pool_key(self) -> PoolKey:
        return pool_key(self.ref, self.extra_args)

    @property
    def spec(self) -> EngineSpec | None:
        """The vLLM server to start for it; None for an engine given by its URL."""
        if self.model_dir is None:
            return None
        return EngineSpec(self.model_dir, self.served_name, None, self.extra_args)


def follows_alias(ref: EngineRef) -> bool:
    """True for a model given as a registry alias (`models:/name@alias`): hot-swapped."""
    return ref.model is not None and ref.model.startswith("models:/") and "@" in ref.model


def resolve_engine(
    role: str, ref: EngineRef, settings: Settings, registry: RegistryView
) -> ResolvedEngine | None:
    """A role's engine as something to start (a local directory) or to call (a URL). None for
    a challenger whose alias is unset: the watcher adds it once the alias appears."""
    name = ref.served_name or str(role)
    if ref.base_url is not None:
        label = ref.model_uri or ref.base_url
        tags: dict[str, str] | None = None
        tags_ref = None
        if ref.model_uri is not None and ref.model_uri.startswith("models:/"):
            tags_ref = ref.model_uri
            try:
                info = registry.lookup(ref.model_uri)
                tags = dict(info.tags) if info is not None else None
            except StillhouseError as exc:  # its threshold can wait for the registry
                log.warning(
                    "cannot read %s's tags (the configured threshold applies): %s",
                    ref.model_uri,
                    exc,
                )
        base_url = ref.base_url.rstrip("/")
        return ResolvedEngine(role, label, name, base_url=base_url, tags=tags, tags_ref=tags_ref)
    assert ref.model is not None
    if ref.model.startswith("models:/"):
        parsed = parse_ref(ref.model, settings.mlflow.registered_model)
        info = registry.lookup(ref.model)
        if info is None:
            if role == Role.CHALLENGER:
                return None
            raise RegistryError(f"no version of {parsed.name} has alias '{parsed.alias}'")
        if role == Role.CHALLENGER and not_served(info.tags, settings):
            log.warning("challenger v%s was rolled back: not served", info.version)
            return None
        model_dir = registry.download(info.uri)
        watch = ref.model if parsed.alias is not None else None
        return ResolvedEngine(
            role,
            info.uri,
            name,
            model_dir,
            extra_args=ref.extra_args,
            watch=watch,
            tags=dict(info.tags),
            tags_ref=None if watch else info.uri,
        )
    path = Path(ref.model).expanduser()
    validate_model_dir(path)
    return ResolvedEngine(role, str(path.resolve()), name, path, extra_args=ref.extra_args)


def resolve_engines(
    refs: Mapping[str, EngineRef], settings: Settings, registry: RegistryView | None = None
) -> dict[str, ResolvedEngine]:
    """The engines to run now. A challenger that follows an alias is left out while the alias
    is unset or names the champion's version (`serve` still follows it). With MLflow down, the
    registry's last answers and the cached weights stand in (`RegistryCache.at_start`)."""
    missing = [role for role in (Role.TEACHER, Role.CHAMPION) if role not in refs]
    if missing:
        raise UsageError(f"no {missing[0]} engine configured (gateway.engines.{missing[0]})")
    view = registry if registry is not None else RegistryCache.for_settings(settings).at_start()
    order = [r for r in ROLES if r in refs] + [r for r in refs if r not in ROLES]
    resolved: dict[str, ResolvedEngine] = {}
    for role in order:
        engine = resolve_engine(role, refs[role], settings, view)
        if engine is None:
            continue
        if role == Role.CHALLENGER and engine.watch and engine.ref == resolved[Role.CHAMPION].ref:
            continue
        resolved[role] = engine
    return resolved


def watched_roles(
    engines: Mapping[str, ResolvedEngine], refs: Mapping[str, EngineRef]
) -> list[WatchedRole]:
    """The student roles as the model watcher sees them: what each follows and serves."""
    roles: list[WatchedRole] = []
    for role in STUDENT_ROLES:
        engine = engines.get(role)
        if engine is not None:
            local = engine.model_dir is not None
            roles.append(
                WatchedRole(
                    role,
                    follow=engine.watch or engine.tags_ref,
                    swappable=engine.watch is not None and local,
                    served_name=engine.served_name,
                    extra_args=engine.extra_args,
                    serving=engine.ref,
                    pool_key=engine.pool_key if local else None,
                    tags=calibration_only(engine.tags) if engine.tags is not None else None,
                )
            )
        elif role in refs and follows_alias(refs[role]):
            ref = refs[role]
            name = ref.served_name or str(role)
            roles.append(WatchedRole(role, ref.model, True, name, ref.extra_args))
    return roles


def start_engines(
    engines: Mapping[str, ResolvedEngine],
    settings: Settings,
    stack: ExitStack,
    console: Console,
    pool: EnginePool | None = None,
) -> dict[str, EngineEndpoint]:
    """Start every local engine at once (they boot in parallel), then wait for each. Roles
    serving the same version share one server. The servers live in `pool` (its owner stops
    them), or without one in a pool that `stack` closes."""
    if pool is None:
        pool = EnginePool(vllm_factory(settings))
        stack.callback(pool.close)
    launched: dict[PoolKey, tuple[str, ManagedEngine]] = {}
    for role, engine in engines.items():
        if engine.spec is not None and engine.pool_key not in launched:
            launched[engine.pool_key] = (role, pool.launch(engine.spec))
    for key, (role, vllm) in launched.items():
        with console.status(f"starting vLLM for the {role}; log: {vllm.log_path}"):
            pool.finish(key, vllm, engines[role].served_name)
    endpoints: dict[str, EngineEndpoint] = {}
    for role, engine in engines.items():
        if engine.model_dir is None:
            assert engine.base_url is not None
            endpoints[role] = EngineEndpoint(engine.base_url, engine.served_name, engine.ref)
            continue
        entry = pool.attach(engine.pool_key)
        console.print(f"{role:<10} {engine.ref}  vLLM at {entry.base_url}")
        endpoints[role] = EngineEndpoint(entry.base_url, entry.served_name, engine.ref)
    return endpoints


def wanted_fingerprints(engines: Mapping[str, ResolvedEngine], settings: Settings) -> set[str]:
    """The fingerprints of the vLLM servers `start_engines` will start (the same factory's
    environment: this process's)."""
    return {
        engine_fingerprint(e.spec, settings.engine, os.environ)
        for e in engines.values()
        if e.spec is not None
    }


def log_to_stderr() -> None:
    """Stillhouse's own log lines (swaps, thresholds, A/B changes) on stderr, once; aiohttp's
    tracebacks for unparseable requests become one counted line a minute."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestLog) for f in server_log.filters):
        server_log.addFilter(MalformedRequestLog())
    logger = logging.getLogger("stillhouse")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


async def run_gateway(
    app: web.Application,
    host: str,
    port: int,
    on_ready: Callable[[str], None],
    admin: tuple[str, int] | None = None,
    listener: socket.socket | None = None,
) -> None:
    """Serve `app` until SIGINT or SIGTERM, then shut down gracefully; also on `admin`
    (host, port) when the admin API has a port of its own. `listener`: a listening socket
    handed over by `stillhouse up` (serving/listener.py), used instead of binding host:port."""
    # handler_cancellation: a client that goes away cancels its request's handler, and with
    # it the engine call (and any teacher fallback) it was waiting on.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        if listener is not None:
            await web.SockSite(runner, listener, shutdown_timeout=10.0).start()
        addresses = [] if listener is not None else [(host, port)]
        for site_host, site_port in [*addresses, *([admin] if admin else [])]:
            site = web.TCPSite(runner, site_host, site_port, shutdown_timeout=10.0)
            try:
                await site.start()
            except OSError as exc:  # taken since the check before the engines started
                raise cannot_listen(site_host, site_port, exc) from None
        bound = runner.addresses[0][1] if runner.addresses else port
        # Everything imported so far (aiohttp, pydantic, maybe torch via the demo) lives for the
        # whole process: frozen, it is out of the garbage collector's full passes, which
        # otherwise stalled requests for ~0.3 s about once a second under load.
        gc.freeze()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        on_ready(f"http://{host}:{bound}")
        await stop.wait()
    finally:
        await runner.cleanup()
        gc.unfreeze()  # let exit-time finalizers see those objects again


def serve(
    settings: Settings,
    engines: Mapping[str, ResolvedEngine],
    environ: Mapping[str, str],
    console: Console,
    refs: Mapping[str, EngineRef] | None = None,
    registry: RegistryCache | None = None,
) -> None:
    """Run the engines and the gateway until Ctrl-C. `refs` (what `engines` were resolved
    from) lets the model watcher follow a challenger alias that is unset right now; `registry`
    is the cache they were resolved through (its fallbacks show in `/admin/engines`)."""
    # User mistakes in the gateway's own settings end here, before minutes of engine start-up.
    load_keys(settings, environ)
    # Under `stillhouse up`: the socket `up` keeps across gateway restarts (serving/listener.py).
    listener = inherited_listener(environ)
    if listener is None:
        check_port_free(settings.gateway.host, settings.gateway.port)
    if settings.gateway.admin_port is not None:
        check_port_free(
            settings.gateway.admin_host or settings.gateway.host, settings.gateway.admin_port
        )
    log_to_stderr()
    # A gateway of this state dir that was killed may have left its engines running: those
    # serving what this one wants are re-adopted as it starts them, the others stopped first.
    notes = engine_notes(settings)
    notes.reap_orphans(keep=wanted_fingerprints(engines, settings))
    with ExitStack() as stack:
        pool = EnginePool(vllm_factory(settings))
        stack.callback(pool.close)  # after the gateway has stopped: engines last
        endpoints = start_engines(engines, settings, stack, console, pool)
        notes.reap_orphans()  # one kept for re-adoption that no role took after all
        app = build_app(settings, endpoints, environ)
        roles = watched_roles(engines, refs or {})
        for role in roles:
            if role.serving is None:
                console.print(f"{role.role:<10} follows {role.follow}: none yet")
        gateway = app[GATEWAY]
        registry = registry if registry is not None else RegistryCache.for_settings(settings)
        for ref, fallback in registry.fallbacks.items():
            console.print(
                f"MLflow is unreachable: {ref} serves its last known version "
                f"({fallback.answer or 'unset'}); watching resumes when MLflow answers"
            )
        watcher = ModelWatcher(gateway.router, gateway.metrics, pool, registry, roles, settings)
        supervisor = EngineSupervisor(pool, gateway.router, gateway.metrics, settings.engine)
        install_watcher(app, watcher, supervisor, registry)
        gw = settings.gateway

        def ready(url: str) -> None:
            console.print(
                f"gateway ready at {url}/v1 (model '{gw.model_name}'); "
                f"traffic log {settings.traffic_log_path}; metrics {url}/metrics"
            )
            console.print("Ctrl-C stops the gateway and every engine.")

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            admin = None if gw.admin_port is None else (gw.admin_host or gw.host, gw.admin_port)
            runner.run(run_gateway(app, gw.host, gw.port, ready, admin, listener))
        console.print("gateway stopped; stopping engines")
