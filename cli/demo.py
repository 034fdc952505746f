"""Demo commands: the embedded demo world (no GPU, no model hub).

stillhouse demo build [--force]    # corpus, tokenizer, teacher (cached under the state dir)
stillhouse demo run                # the whole weekly loop on it: what `make demo` runs
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from stillhouse.cli.context import settings_of


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="The embedded demo world (no GPU, no model hub).", no_args_is_help=True
    )
    group.command("build")(demo_build)
    group.command("run")(demo_run)
    app.add_typer(group, name="demo")


def demo_build(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache is current.")] = False,
) -> None:
    """Build (or reuse) the demo corpus, tokenizer and teacher, and print the teacher's accuracy."""
    from stillhouse.demo.build import build_demo_world, ensure_teacher_evaluated
    from stillhouse.demo.summary import print_build_summary

    settings = settings_of(ctx)
    console = Console()
    world = build_demo_world(settings, force=force, console=console)
    ensure_teacher_evaluated(world, settings, console)
    print_build_summary(world, console)


def demo_run(ctx: typer.Context) -> None:
    """Build the demo world, distil and register students, and run one rollout cycle on it."""
    from stillhouse.cli.evaluation import run_report
    from stillhouse.demo.run import run_demo

    run_demo(settings_of(ctx), Console(), write_report=run_report)
