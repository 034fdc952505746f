"""What every command shares: the loaded settings, and the demo world filling in what they
leave unset (only for the commands that need a teacher or prompts: `demo/defaults.py`)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console

from stillhouse.common.config import Settings, load_settings


@dataclass
class CliState:
    """`ctx.obj` of every command: the `--config` path, and the settings once loaded."""

    config: Path | None
    _settings: Settings | None = field(default=None, repr=False)

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings


def settings_of(ctx: typer.Context) -> Settings:
    state: CliState = ctx.obj
    return state.settings()


def completed_settings(ctx: typer.Context, needs: Collection[str], console: Console) -> Settings:
    """The settings, with the demo world's values for `needs` where the config has none."""
    return with_demo(settings_of(ctx), needs, console)


def with_demo(settings: Settings, needs: Collection[str], console: Console) -> Settings:
    from stillhouse.demo.defaults import complete_settings  # torch: only when needed

    return complete_settings(settings, needs, console)
