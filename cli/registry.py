"""Registry commands: the student model's versions, and one version's files.

stillhouse registry list                           # versions, aliases, key metrics
stillhouse registry pull REF --dest DIR            # e.g. models:/stillhouse-student@champion
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from stillhouse.cli.context import settings_of


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The MLflow model registry.", no_args_is_help=True)
    group.command("list")(registry_list)
    group.command("pull")(registry_pull)
    app.add_typer(group, name="registry")


def registry_list(ctx: typer.Context) -> None:
    """Versions of the student model with their aliases and key metrics."""
    from stillhouse.common.registry import RegistryClient, versions_table

    settings = settings_of(ctx)
    versions = RegistryClient.from_settings(settings).list_versions()
    if not versions:
        Console().print(
            f"no versions of {settings.mlflow.registered_model} yet "
            f"(tracking URI {settings.tracking_uri})"
        )
        return
    keys = ["kd.category_accuracy", "kd.best_heldout_kl"]
    title = f"{settings.mlflow.registered_model} ({settings.tracking_uri})"
    Console().print(versions_table(versions, keys, tag_keys=("data_window",), title=title))


def registry_pull(
    ctx: typer.Context,
    ref: Annotated[
        str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, or an alias.")
    ],
    dest: Annotated[Path, typer.Option(help="Cache folder: files land in DEST/NAME/VERSION/.")],
) -> None:
    """Download a registered version's model directory (e.g. for a plain vLLM server)."""
    from stillhouse.common.registry import RegistryClient

    client = RegistryClient.from_settings(settings_of(ctx))
    info = client.resolve(ref)
    path = client.download(info.uri, dest)
    typer.echo(f"{info.uri} -> {path}")
