"""The `stillhouse` command: the composition root. Every failure a user can cause ends here as
one line on stderr and a non-zero exit code (`StillhouseError.exit_code`), never a traceback.

    stillhouse --help
    stillhouse version
    stillhouse demo build                  # corpus, tokenizer, teacher (cached under the state dir)
    stillhouse demo run                    # build, serve the teacher on vLLM, ask it real tickets
    stillhouse engines serve --model PATH  # one vLLM server in the foreground; Ctrl-C stops it
    stillhouse serve                       # teacher + students behind the gateway; Ctrl-C stops
    stillhouse judge | drift | ab | report # evaluation over the traffic log (--since 2h)
    stillhouse calibrate [VERSION]         # the version's fallback threshold, on held-out prompts
    stillhouse promote VERSION | rollback  # move the champion alias by hand, recorded
    stillhouse controller                  # the rollout loop against a running gateway
    stillhouse up                          # gateway + engines, controller and schedule together
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from stillhouse import __version__
from stillhouse.common.config import Settings, load_settings
from stillhouse.common.errors import StillhouseError

app = typer.Typer(
    name="stillhouse",
    help="Distill, serve, A/B-test, judge and promote student language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
engines_app = typer.Typer(help="Run vLLM inference engines.", no_args_is_help=True)
demo_app = typer.Typer(help="The embedded demo world (no GPU, no model hub).", no_args_is_help=True)
registry_app = typer.Typer(help="The MLflow model registry.", no_args_is_help=True)
app.add_typer(engines_app, name="engines")
app.add_typer(demo_app, name="demo")
app.add_typer(registry_app, name="registry")


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj["settings_loader"]()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config (default: ./stillhouse.yaml if present)."),
    ] = None,
) -> None:
    # Settings load lazily so that `--help` and `version` work even with a broken config.
    ctx.obj = {"settings_loader": lambda: load_settings(config), "config": config}


@app.command()
def version() -> None:
    """Print the Stillhouse version."""
    typer.echo(f"stillhouse {__version__}")


@engines_app.command("serve")
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

    settings = _settings(ctx)
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


@demo_app.command("build")
def demo_build(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache is current.")] = False,
) -> None:
    """Build (or reuse) the demo corpus, tokenizer and teacher, and print the teacher's accuracy."""
    from stillhouse.demo.build import build_demo_world, ensure_teacher_evaluated
    from stillhouse.demo.summary import print_build_summary

    settings = _settings(ctx)
    console = Console()
    world = build_demo_world(settings, force=force, console=console)
    ensure_teacher_evaluated(world, settings, console)
    print_build_summary(world, console)


@demo_app.command("run")
def demo_run(ctx: typer.Context) -> None:
    """Build the demo world, serve the teacher on vLLM and send it real tickets."""
    from stillhouse.demo.run import run_demo

    run_demo(_settings(ctx), Console())


@app.command()
def redistill(
    ctx: typer.Context,
    prepare_only: Annotated[
        bool,
        typer.Option(help="Collect targets and write the training jobs for accelerate; stop."),
    ] = False,
) -> None:
    """Distil a new student from recent prompts and register it as the `challenger`."""
    from stillhouse.cli.distill_output import print_redistill_outcome
    from stillhouse.rollout.distill.pipeline import redistill as run_redistill

    console = Console()
    outcome = run_redistill(_settings(ctx), console, prepare_only=prepare_only)
    if prepare_only:
        return
    print_redistill_outcome(outcome, console)


@app.command()
def schedule(
    ctx: typer.Context,
    max_runs: Annotated[
        int | None, typer.Option(help="Stop after this many runs (default: run forever).")
    ] = None,
) -> None:
    """Re-distil on the configured cron schedule (default Sundays 02:00 UTC), one at a time."""
    from stillhouse.cli.distill_output import print_redistill_outcome
    from stillhouse.rollout.distill.pipeline import redistill as run_redistill
    from stillhouse.rollout.schedule import CronSchedule, run_scheduler

    settings = _settings(ctx)
    console = Console()
    cron = CronSchedule.parse(settings.schedule.cron)

    def job(slot: object) -> None:
        console.rule(f"re-distillation for the slot {slot}")
        print_redistill_outcome(run_redistill(settings, console), console)

    console.print(f"schedule: '{settings.schedule.cron}' (UTC); state in {settings.state_dir}")
    run_scheduler(
        cron,
        job,
        settings.state_dir,
        max_runs=max_runs,
        log=lambda line: console.print(line, markup=False, highlight=False),
    )


@app.command()
def serve(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="Gateway port (default: config, 8000).")] = None,
) -> None:
    """Start the engines (teacher, champion, challenger) and the gateway; Ctrl-C stops all."""
    import os

    from stillhouse.demo.engines import engine_refs
    from stillhouse.serving.serve import resolve_engines
    from stillhouse.serving.serve import serve as run_serve

    settings = _settings(ctx)
    if port is not None:
        settings = settings.model_copy(
            update={"gateway": settings.gateway.model_copy(update={"port": port})}
        )
    console = Console()
    refs = engine_refs(settings, console)
    engines = resolve_engines(refs, settings)
    run_serve(settings, engines, os.environ, console, refs)


SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="Window start: a duration back from now (30m, 2h, 7d) or an ISO time "
        "(default: evaluation.window_hours).",
    ),
]


@app.command()
def judge(
    ctx: typer.Context,
    since: SinceOption = None,
    sample: Annotated[
        int | None,
        typer.Option(min=1, help="Requests per arm (default: evaluation.judge.sample_per_arm)."),
    ] = None,
) -> None:
    """Judge a sample of each arm's answers with the LLM judge (single and pairwise)."""
    from stillhouse.cli.evaluation import run_judge

    run_judge(_settings(ctx), Console(), since=since, sample=sample)


@app.command()
def drift(ctx: typer.Context, since: SinceOption = None) -> None:
    """Student-teacher divergence per student and whether it drifted from its reference."""
    from stillhouse.cli.evaluation import run_drift

    run_drift(_settings(ctx), Console(), since=since)


@app.command()
def ab(ctx: typer.Context, since: SinceOption = None) -> None:
    """The A/B test: per-arm quality, fallbacks, latency, cost, SRM check and the verdict."""
    from stillhouse.cli.evaluation import run_ab

    run_ab(_settings(ctx), Console(), since=since)


@app.command()
def report(
    ctx: typer.Context,
    since: SinceOption = None,
    out: Annotated[
        Path | None, typer.Option(help="HTML file (default: <state_dir>/reports/...).")
    ] = None,
) -> None:
    """One self-contained HTML report with plots, also logged to MLflow."""
    from stillhouse.cli.evaluation import run_report

    path = run_report(_settings(ctx), Console(), since=since, out=out)
    Console().print(f"report: {path}")


@registry_app.command("list")
def registry_list(ctx: typer.Context) -> None:
    """Versions of the student model with their aliases and key metrics."""
    from stillhouse.common.registry import RegistryClient, versions_table

    settings = _settings(ctx)
    client = RegistryClient.from_settings(settings)
    versions = client.list_versions()
    if not versions:
        Console().print(
            f"no versions of {settings.mlflow.registered_model} yet "
            f"(tracking URI {settings.tracking_uri})"
        )
        return
    keys = ["kd.category_accuracy", "kd.best_heldout_kl"]
    title = f"{settings.mlflow.registered_model} ({settings.tracking_uri})"
    Console().print(versions_table(versions, keys, tag_keys=("data_window",), title=title))


@registry_app.command("pull")
def registry_pull(
    ctx: typer.Context,
    ref: Annotated[
        str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, or an alias.")
    ],
    dest: Annotated[Path, typer.Option(help="Cache folder: files land in DEST/NAME/VERSION/.")],
) -> None:
    """Download a registered version's model directory (e.g. for a plain vLLM server)."""
    from stillhouse.common.registry import RegistryClient

    settings = _settings(ctx)
    client = RegistryClient.from_settings(settings)
    info = client.resolve(ref)
    path = client.download(info.uri, dest)
    typer.echo(f"{info.uri} -> {path}")


@app.command()
def calibrate(
    ctx: typer.Context,
    version: Annotated[
        str | None, typer.Argument(help="A version number or alias (default: the challenger).")
    ] = None,
) -> None:
    """Pick the version's fallback threshold on held-out prompts (Learn-then-Test) and tag it."""
    from stillhouse.cli.rollout import run_calibrate

    run_calibrate(_settings(ctx), version, Console())


ReasonOption = Annotated[str, typer.Option(help="Why, recorded with the decision.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


@app.command()
def promote(
    ctx: typer.Context,
    version: Annotated[int, typer.Argument(min=1, help="The version to make the champion.")],
    reason: ReasonOption = "promoted by hand",
    yes: YesOption = False,
) -> None:
    """Make VERSION the champion (the old one becomes previous-champion), recorded in MLflow."""
    from stillhouse.cli.rollout import run_promote

    run_promote(_settings(ctx), version, reason, yes, Console())


@app.command()
def rollback(
    ctx: typer.Context, reason: ReasonOption = "rolled back by hand", yes: YesOption = False
) -> None:
    """Point champion back at previous-champion, recorded in MLflow."""
    from stillhouse.cli.rollout import run_rollback

    run_rollback(_settings(ctx), reason, yes, Console())


@app.command()
def controller(ctx: typer.Context) -> None:
    """The rollout controller: calibrate, shadow, ramp, promote or roll back each challenger."""
    from stillhouse.cli.rollout import run_controller_command

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run_controller_command(_settings(ctx), Console(), stop)


@app.command()
def up(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="Gateway port (default: config, 8000).")] = None,
    schedule: Annotated[
        bool, typer.Option(help="Also re-distil on the configured cron schedule.")
    ] = True,
    with_prometheus: Annotated[
        bool,
        typer.Option(help="Also run a local Prometheus with the shipped config and rules."),
    ] = False,
    prometheus_port: Annotated[
        int, typer.Option(help="Port of the local Prometheus.", min=1, max=65535)
    ] = 9090,
) -> None:
    """Engines, gateway, rollout controller and weekly re-distillation together; Ctrl-C stops."""
    from stillhouse.cli.up import run_up

    run_up(
        _settings(ctx),
        ctx.obj["config"],
        Console(),
        port=port,
        with_schedule=schedule,
        prometheus_port=prometheus_port if with_prometheus else None,
    )


def _quiet_foreign_loggers() -> None:
    # MLflow and alembic narrate schema migrations at INFO on first use; users need none of it.
    # MLflow resets its loggers when imported, from MLFLOW_LOGGING_LEVEL (a user's value wins).
    import logging
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main() -> None:
    _quiet_foreign_loggers()
    try:
        app()
    except StillhouseError as e:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {e}", markup=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
