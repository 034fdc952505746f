"""Serving commands: the gateway with its engines, and one vLLM server on its own.

stillhouse serve [--port 8000]                     # teacher + students behind the gateway
stillhouse engines serve --model PATH [--name N]   # one vLLM server; Ctrl-C stops it
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from stillhouse.cli.context import completed_settings, settings_of
from stillhouse.common.errors import StillhouseError


def register(app: typer.Typer) -> None:
    app.command()(serve)
    engines = typer.Typer(help="Run vLLM inference engines.", no_args_is_help=True)
    engines.command("serve")(engines_serve)
    app.add_typer(engines, name="engines")


def serve(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="Gateway port (default: config, 8000).")] = None,
) -> None:
    """Start the engines (teacher, champion, challenger) and the gateway; Ctrl-C stops all."""
    from stillhouse.serving.engines.registry_view import RegistryCache
    from stillhouse.serving.serve import resolve_engines
    from stillhouse.serving.serve import serve as run_serve
    from stillhouse.serving.student_refs import engine_refs

    console = Console()
    settings = completed_settings(ctx, {"teacher"}, console)
    if port is not None:
        gateway = settings.gateway.model_copy(update={"port": port})
        settings = settings.model_copy(update={"gateway": gateway})
    # One cache for start-up and the watcher: MLflow down, the last answers stand in.
    registry = RegistryCache.for_settings(settings)
    refs = engine_refs(settings, registry.at_start(), console.print)
    engines = resolve_engines(refs, settings, registry.at_start())
    run_serve(settings, engines, os.environ, console, refs, registry)


def engines_serve(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option(help="Model directory (config.json + weights).")],
    name: Annotated[str | None, typer.Option(help="Served model name (default: dir name).")] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default: config, else a free one).")
    ] = None,
    engine_arg: Annotated[
        list[str] | None,
        typer.Option("--engine-arg", help="Passed to vLLM as is; repeat for each token."),
    ] = None,
) -> None:
    """Serve one model with vLLM in the foreground until Ctrl-C."""
    from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine

    settings = settings_of(ctx)
    spec = EngineSpec(model, name or model.resolve().name, port, tuple(engine_arg or ()))
    engine = VllmEngine(spec, settings.engine, settings.logs_dir)
    console = Console(stderr=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with console.status(f"starting vLLM for {model} (log: {engine.log_path})"):
            engine.start()
            engine.wait_ready()
        # Once serving, Ctrl-C is handled like SIGTERM, explicitly: a process started from a
        # non-interactive shell's background job inherits SIGINT as ignored, and Python then
        # never raises KeyboardInterrupt (this hung a CI run of the Ctrl-C test).
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        console.print(
            f"serving [bold]{spec.served_model_name}[/] at {engine.base_url}  (Ctrl-C stops)"
        )
        while not stop.wait(1.0):
            if engine.exited():
                raise StillhouseError(f"vLLM server exited; see {engine.log_path}")
        console.print("stopping...")
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        engine.stop()
    console.print("stopped")
