"""The `stillhouse` command: the composition root. Every failure a user can cause ends here as
one line on stderr and a non-zero exit code (`StillhouseError.exit_code`), never a traceback.

    stillhouse --help
    stillhouse demo run                    # the whole loop on the embedded demo world
    stillhouse serve                       # teacher + students behind the gateway; Ctrl-C stops
    stillhouse redistill | schedule        # one re-distillation, or on the cron schedule
    stillhouse judge | drift | ab | report # evaluation over the traffic log (--since 2h)
    stillhouse calibrate | promote | rollback | controller | up

Each command group lives in its own module (cli/serve.py, distill.py, evaluation.py, rollout.py,
registry.py, up.py, demo.py), which registers its commands here.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from stillhouse import __version__
from stillhouse.cli import demo, distill, evaluation, registry, rollout, serve, up
from stillhouse.cli.context import CliState
from stillhouse.common.errors import StillhouseError


def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config (default: ./stillhouse.yaml if present)."),
    ] = None,
) -> None:
    # Settings load lazily so that `--help` and `version` work even with a broken config.
    ctx.obj = CliState(config)


def version() -> None:
    """Print the Stillhouse version."""
    typer.echo(f"stillhouse {__version__}")


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="stillhouse",
        help="Distill, serve, A/B-test, judge and promote student language models.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    app.callback()(_root)
    app.command()(version)
    for group in (serve, demo, distill, evaluation, registry, rollout, up):
        group.register(app)
    return app


def _quiet_foreign_loggers() -> None:
    # MLflow and alembic narrate schema migrations at INFO on first use; users need none of it.
    # MLflow resets its loggers when imported, from MLFLOW_LOGGING_LEVEL (a user's value wins).
    import logging
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: it unwinds like Ctrl-C (every `finally` and exit
    stack runs, so engines a command started are stopped), then the process exits 143."""


def main() -> None:
    _quiet_foreign_loggers()
    terminated: list[int] = []

    def on_sigterm(signum: int, frame: object) -> None:
        terminated.append(signum)
        raise Terminated

    # Python's default SIGTERM ends the process on the spot, leaving the vLLM servers a
    # command started running (`kill`, `up` stopping a child, Kubernetes). Commands that
    # shut down in their own way (serve once ready, up, controller) install their own.
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        build_app()()
    except StillhouseError as e:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {e}", markup=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGTERM if terminated else 130)
    except SystemExit:
        if terminated:  # typer turned the interrupt into exit 130; SIGTERM's is 143
            sys.exit(128 + signal.SIGTERM)
        raise


if __name__ == "__main__":
    main()
