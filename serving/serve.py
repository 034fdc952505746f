"""`stillhouse serve`: the configured engines and the gateway in front of them, until Ctrl-C.

    stillhouse serve                      # the demo teacher and champion student
    stillhouse --config stillhouse.yaml serve

Each role (teacher, champion, optional challenger) is a model directory or a registry
reference such as `models:/stillhouse-student@champion` (downloaded once into the state dir's
cache, then started as a vLLM server here), or the `base_url` of an engine already running.
Ctrl-C or SIGTERM stops the gateway first (in-flight requests finish), then every engine.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import uvloop
from aiohttp import web
from rich.console import Console

from stillhouse.common.config import EngineRef, Settings
from stillhouse.common.errors import UsageError
from stillhouse.common.registry import RegistryClient
from stillhouse.serving.app import EngineEndpoint, build_app, load_keys
from stillhouse.serving.engine import EngineSpec, VllmEngine, validate_model_dir


@dataclass(frozen=True)
class ResolvedEngine:
    role: str
    ref: str  # what the traffic log records: a registry version URI or a path
    served_name: str
    model_dir: Path | None = None  # start it here
    base_url: str | None = None  # or it is running already
    extra_args: tuple[str, ...] = ()


def resolve_engine(
    role: str, ref: EngineRef, settings: Settings, registry: Callable[[], RegistryClient]
) -> ResolvedEngine:
    """A role's engine as something to start (a local directory) or to call (a URL)."""
    name = ref.served_name or role
    if ref.base_url is not None:
        label = ref.model_uri or ref.base_url
        return ResolvedEngine(role, label, name, base_url=ref.base_url.rstrip("/"))
    assert ref.model is not None
    if ref.model.startswith("models:/"):
        client = registry()
        info = client.resolve(ref.model)
        model_dir = client.download(info.uri, settings.state_dir / "cache" / "models")
        return ResolvedEngine(role, info.uri, name, model_dir, extra_args=ref.extra_args)
    path = Path(ref.model).expanduser()
    validate_model_dir(path)
    return ResolvedEngine(role, str(path.resolve()), name, path, extra_args=ref.extra_args)


def resolve_engines(refs: Mapping[str, EngineRef], settings: Settings) -> dict[str, ResolvedEngine]:
    missing = [role for role in ("teacher", "champion") if role not in refs]
    if missing:
        raise UsageError(f"no {missing[0]} engine configured (gateway.engines.{missing[0]})")
    clients: list[RegistryClient] = []

    def registry() -> RegistryClient:
        if not clients:
            clients.append(RegistryClient.from_settings(settings))
        return clients[0]

    return {role: resolve_engine(role, refs[role], settings, registry) for role in refs}


def start_engines(
    engines: Mapping[str, ResolvedEngine], settings: Settings, stack: ExitStack, console: Console
) -> dict[str, EngineEndpoint]:
    """Start every local engine at once (they boot in parallel), then wait for each."""
    local: dict[str, VllmEngine] = {}
    endpoints: dict[str, EngineEndpoint] = {}
    for role, engine in engines.items():
        if engine.model_dir is None:
            assert engine.base_url is not None
            endpoints[role] = EngineEndpoint(engine.base_url, engine.served_name, engine.ref)
            continue
        spec = EngineSpec(engine.model_dir, engine.served_name, None, engine.extra_args)
        vllm = VllmEngine(spec, settings.engine, settings.logs_dir)
        stack.callback(vllm.stop)
        vllm.start()
        local[role] = vllm
    for role, vllm in local.items():
        with console.status(f"starting vLLM for the {role}; log: {vllm.log_path}"):
            vllm.wait_ready()
        console.print(f"{role:<10} {engines[role].ref}  vLLM at {vllm.base_url}")
        endpoints[role] = EngineEndpoint(
            vllm.base_url, engines[role].served_name, engines[role].ref
        )
    return endpoints


def check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(
                f"the gateway cannot listen on {host}:{port} ({exc.strerror}); "
                "choose another with --port or gateway.port"
            ) from None


async def run_gateway(
    app: web.Application, host: str, port: int, on_ready: Callable[[str], None]
) -> None:
    """Serve `app` until SIGINT or SIGTERM, then shut down gracefully."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, shutdown_timeout=10.0)
        try:
            await site.start()
        except OSError as exc:  # taken since the check before the engines started
            raise UsageError(
                f"the gateway cannot listen on {host}:{port} ({exc.strerror})"
            ) from None
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
) -> None:
    # User mistakes in the gateway's own settings end here, before minutes of engine start-up.
    load_keys(settings, environ)
    check_port_free(settings.gateway.host, settings.gateway.port)
    with ExitStack() as stack:
        endpoints = start_engines(engines, settings, stack, console)
        app = build_app(settings, endpoints, environ)
        gw = settings.gateway

        def ready(url: str) -> None:
            console.print(
                f"gateway ready at {url}/v1 (model '{gw.model_name}'); "
                f"traffic log {settings.traffic_log_path}; metrics {url}/metrics"
            )
            console.print("Ctrl-C stops the gateway and every engine.")

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run_gateway(app, gw.host, gw.port, ready))
        console.print("gateway stopped; stopping engines")
