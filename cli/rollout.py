"""Rollout commands: the fallback threshold, promotion and rollback by hand, the controller.

stillhouse calibrate [VERSION]        # default: the challenger; starts the engines it needs
stillhouse promote VERSION [--yes]    # by hand (admin): champion → VERSION, recorded
stillhouse rollback [--yes]           # champion → previous-champion, recorded
stillhouse controller                 # the rollout loop against a running gateway
stillhouse rollout pause|resume|abort  # tell the controller to hold, go on, or roll back now
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Annotated

import typer
from rich.console import Console

from stillhouse.cli.context import completed_settings, settings_of, with_demo
from stillhouse.common.config import EngineRef, Settings
from stillhouse.common.errors import UsageError
from stillhouse.common.registry import RegistryClient, VersionInfo
from stillhouse.common.roles import Alias, Role
from stillhouse.common.tracking import RunTracker
from stillhouse.rollout.gateway_admin import GatewayAdmin, GatewayAdminError


def register(app: typer.Typer) -> None:
    for command in (calibrate, promote, rollback, controller):
        app.command()(command)
    operator = typer.Typer(
        help="Tell the rollout controller to pause, resume or abort the rollout under way.",
        no_args_is_help=True,
    )
    for command in (pause, resume, abort):
        operator.command()(command)
    app.add_typer(operator, name="rollout")


ReasonOption = Annotated[str, typer.Option(help="Why, recorded with the decision.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def calibrate(
    ctx: typer.Context,
    version: Annotated[
        str | None, typer.Argument(help="A version number or alias (default: the challenger).")
    ] = None,
) -> None:
    """Pick the version's fallback threshold on held-out prompts (Learn-then-Test) and tag it."""
    console = Console()
    run_calibrate(completed_settings(ctx, {"teacher", "calibration"}, console), version, console)


def promote(
    ctx: typer.Context,
    version: Annotated[int, typer.Argument(min=1, help="The version to make the champion.")],
    reason: ReasonOption = "promoted by hand",
    yes: YesOption = False,
) -> None:
    """Make VERSION the champion (the old one becomes previous-champion), recorded in MLflow."""
    run_promote(settings_of(ctx), version, reason, yes, Console())


def rollback(
    ctx: typer.Context, reason: ReasonOption = "rolled back by hand", yes: YesOption = False
) -> None:
    """Point champion back at previous-champion, recorded in MLflow."""
    run_rollback(settings_of(ctx), reason, yes, Console())


def controller(ctx: typer.Context) -> None:
    """The rollout controller: calibrate, mirror, ramp, promote or roll back each challenger."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run_controller_command(settings_of(ctx), Console(), stop)


def pause(ctx: typer.Context, reason: ReasonOption = "") -> None:
    """Hold the rollout where it is: no step advances, and a share you set by hand stands."""
    run_operator_request(settings_of(ctx), "pause", reason, Console())


def resume(ctx: typer.Context, reason: ReasonOption = "") -> None:
    """Go on with a paused rollout (the current step's clock starts again)."""
    run_operator_request(settings_of(ctx), "resume", reason, Console())


def abort(ctx: typer.Context, reason: ReasonOption = "", yes: YesOption = False) -> None:
    """Roll the challenger under rollout back now: share 0, recorded in the registry."""
    _confirm("Roll the challenger under rollout back now?", yes)
    run_operator_request(settings_of(ctx), "abort", reason, Console())


def run_operator_request(settings: Settings, command: str, reason: str, console: Console) -> None:
    """Queue the request in the controller's store; the controller takes it at its next tick."""
    from stillhouse.rollout.controller.core import OperatorRequest
    from stillhouse.rollout.controller.store import ControllerStore
    from stillhouse.rollout.promotion import admin_actor

    store = ControllerStore.open(settings.controller_dir)
    store.request(OperatorRequest(command, admin_actor(), reason), time.time())
    tick = settings.rollout.controller.tick_s
    console.print(
        f"{command} queued for the rollout controller ({settings.controller_dir}); it takes "
        f"effect at its next tick (every {tick:g} s) and is logged there"
    )


def resolve_version(registry: RegistryClient, version: str | None) -> VersionInfo:
    """A version number, an alias, or (None) the challenger."""
    name = registry.registered_model
    if version is None:
        found = registry.get_alias(Alias.CHALLENGER)
        if found is None:
            raise UsageError(f"{name} has no challenger: name a version (e.g. `calibrate 3`)")
        return found
    if version.isdigit():
        return registry.resolve_version(int(version))
    return registry.resolve(registry.alias_uri(version))


def run_calibrate(settings: Settings, version: str | None, console: Console) -> None:
    """Serve the version and the teacher on vLLM here, calibrate, stop them."""
    from stillhouse.rollout.calibration.job import calibrate_version
    from stillhouse.rollout.calibration.prompts import calibration_prompts
    from stillhouse.serving.serve import resolve_engines, start_engines
    from stillhouse.serving.student_refs import teacher_ref

    registry = RegistryClient.from_settings(settings)
    info = resolve_version(registry, version)
    # The version under calibration is served as the champion role of this private engine set.
    student = EngineRef(model=info.uri, served_name="student")
    refs = {Role.TEACHER: teacher_ref(settings), Role.CHAMPION: student}
    engines = resolve_engines(refs, settings)
    prompts, test_prompts = calibration_prompts(settings)
    with ExitStack() as stack:
        endpoints = start_engines(engines, settings, stack, console)
        calibrate_version(
            settings,
            info.version,
            student_url=endpoints[Role.CHAMPION].base_url,
            student_name="student",
            teacher_url=endpoints[Role.TEACHER].base_url,
            teacher_name=endpoints[Role.TEACHER].served_name,
            prompts=prompts,
            test_prompts=test_prompts,
            console=console,
        )


def _refresh_gateway(settings: Settings, console: Console, environ: Mapping[str, str]) -> None:
    """Best effort: tell a running gateway to look at the aliases now."""
    gw = settings.gateway
    key = environ.get(gw.admin_key_env, "").strip()
    if not key:
        console.print(f"a running gateway picks the change up within {gw.watch_interval_s:.0f} s")
        return
    admin = GatewayAdmin(settings.rollout.controller.gateway_url, key)
    try:
        admin.refresh()
        console.print(f"gateway at {admin.url} asked to swap now")
    except GatewayAdminError as exc:
        console.print(f"no gateway told ({exc}); a running one polls the registry itself")
    finally:
        admin.close()


def _confirm(question: str, yes: bool) -> None:
    import sys

    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{question} Add --yes to confirm when not at a terminal.")
    if not typer.confirm(question, default=False):
        raise UsageError("nothing changed")


def run_promote(settings: Settings, version: int, reason: str, yes: bool, console: Console) -> None:
    from stillhouse.rollout.promotion import admin_actor, promote

    registry = RegistryClient.from_settings(settings)
    name = registry.registered_model
    target = registry.resolve_version(version)
    current = registry.get_alias(Alias.CHAMPION)
    was = f"version {current.version}" if current else "no champion"
    _confirm(f"Make {name} version {target.version} the champion (now {was})?", yes)
    tracker = RunTracker(registry, settings.mlflow.experiment)
    record = promote(registry, tracker, target.version, actor=admin_actor(), reason=reason)
    console.print(record.summary_line(), markup=False)
    _refresh_gateway(settings, console, os.environ)


def run_rollback(settings: Settings, reason: str, yes: bool, console: Console) -> None:
    from stillhouse.rollout.promotion import admin_actor, rollback_champion

    registry = RegistryClient.from_settings(settings)
    current = registry.get_alias(Alias.CHAMPION)
    previous = registry.get_alias(Alias.PREVIOUS_CHAMPION)
    if current is not None and previous is not None:
        _confirm(
            f"Roll the champion back from version {current.version} to {previous.version}?", yes
        )
    tracker = RunTracker(registry, settings.mlflow.experiment)
    record = rollback_champion(registry, tracker, actor=admin_actor(), reason=reason)
    console.print(record.summary_line(), markup=False)
    _refresh_gateway(settings, console, os.environ)


def run_controller_command(
    settings: Settings, console: Console, stop: threading.Event | None = None
) -> None:
    from stillhouse.rollout.calibration.prompts import calibration_prompts
    from stillhouse.rollout.controller.core import ControllerState, Observation
    from stillhouse.rollout.controller.loop import run_controller
    from stillhouse.rollout.controller.metrics import (
        MetricsServer,
        controller_registry,
        serve_controller_metrics,
    )
    from stillhouse.rollout.controller.runtime import ControllerRuntime
    from stillhouse.rollout.controller.store import ControllerStore

    cfg = settings.rollout.controller
    admin = GatewayAdmin.from_environment(
        cfg.gateway_url, settings.gateway.admin_key_env, os.environ
    )

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    def prompts(settings: Settings) -> tuple[list, list]:
        # The demo world's held-out splits when nothing else is configured; built only now,
        # when a challenger first needs calibrating.
        return calibration_prompts(with_demo(settings, {"calibration"}, console))

    registry_client = RegistryClient.from_settings(settings)
    runtime = ControllerRuntime(settings, admin, registry_client, log, prompts=prompts)
    store = ControllerStore.open(settings.controller_dir)
    collector, registry = controller_registry(settings.metrics_dir, store, cfg)
    servers: list[MetricsServer] = []

    def observe(state: ControllerState) -> Observation:
        obs = runtime.observe(state)
        collector.observed(obs)
        return obs

    def serve_metrics() -> None:
        server = serve_controller_metrics(registry, cfg)
        if server is not None:
            servers.append(server)
            log(f"metrics: {server.url}")

    log(f"controller: gateway {cfg.gateway_url}, steps {list(cfg.steps)}, tick {cfg.tick_s:g} s")
    try:
        run_controller(
            store,
            observe,
            runtime.execute,
            cfg,
            stop=stop or threading.Event(),
            log=log,
            on_locked=serve_metrics,
            abandon=runtime.abandon,
        )
    finally:
        admin.close()
        for server in servers:
            server.close()
