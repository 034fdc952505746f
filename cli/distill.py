"""Re-distillation commands: one run now, or one per cron slot.

stillhouse redistill [--prepare-only]     # prompts -> teacher targets -> student -> MLflow
stillhouse schedule [--max-runs N]        # the same on `schedule.cron` (default Sundays)
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from stillhouse.cli.context import settings_of
from stillhouse.common.config import Settings


def register(app: typer.Typer) -> None:
    app.command()(redistill)
    app.command()(schedule)


def redistill(
    ctx: typer.Context,
    prepare_only: Annotated[
        bool,
        typer.Option(help="Collect targets and write the training jobs for accelerate; stop."),
    ] = False,
) -> None:
    """Distil a new student from recent prompts and register it as the `challenger`."""
    console = Console()
    outcome = _redistill_once(settings_of(ctx), console, prepare_only=prepare_only)
    if not prepare_only:
        from stillhouse.rollout.distill.summary import print_redistill_outcome

        print_redistill_outcome(outcome, console)


def _redistill_once(settings: Settings, console: Console, *, prepare_only: bool = False) -> Any:
    """One run, with the demo world's prompts, teacher and served evaluation where the config
    names none (built or reused only then)."""
    from stillhouse.demo.distill_hooks import demo_redistill_inputs
    from stillhouse.rollout.distill.pipeline import redistill as run_redistill

    settings, hooks = demo_redistill_inputs(settings, console)
    return run_redistill(settings, console, hooks=hooks, prepare_only=prepare_only)


def schedule(
    ctx: typer.Context,
    max_runs: Annotated[
        int | None, typer.Option(help="Stop after this many runs (default: run forever).")
    ] = None,
) -> None:
    """Re-distil on the configured cron schedule (default Sundays 02:00 UTC), one at a time."""
    from stillhouse.rollout.distill.summary import print_redistill_outcome
    from stillhouse.rollout.schedule import CronSchedule, run_scheduler

    console = Console()
    settings = settings_of(ctx)
    cron = CronSchedule.parse(settings.schedule.cron)

    def job(slot: object) -> None:
        console.rule(f"re-distillation for the slot {slot}")
        print_redistill_outcome(_redistill_once(settings, console), console)

    console.print(f"schedule: '{settings.schedule.cron}' (UTC); state in {settings.state_dir}")
    run_scheduler(
        cron,
        job,
        settings.state_dir,
        max_runs=max_runs,
        log=lambda line: console.print(line, markup=False, highlight=False),
    )
