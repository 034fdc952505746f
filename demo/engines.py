"""Which models `stillhouse serve` runs when the config names none: the demo teacher, and the
registry's `champion` student (plus its `challenger`, when one is registered). The students are
given as aliases, so the gateway follows them when they move (hot swap)."""

from __future__ import annotations

from rich.console import Console

from stillhouse.common.config import EngineRef, Settings
from stillhouse.common.errors import UsageError
from stillhouse.common.registry import RegistryClient


def engine_refs(
    settings: Settings, console: Console, *, teacher_only: bool = False
) -> dict[str, EngineRef]:
    """The configured engines, with demo defaults for the roles the config leaves unset."""
    configured = settings.gateway.engines
    refs: dict[str, EngineRef] = {}
    if configured.teacher is not None:
        refs["teacher"] = configured.teacher
    else:
        from stillhouse.demo.build import build_demo_world  # torch: only when needed

        world = build_demo_world(settings, console=console)
        refs["teacher"] = EngineRef(model=str(world.teacher_dir), served_name="teacher")
    if teacher_only:
        return refs
    if configured.champion is not None and configured.challenger is not None:
        return {**refs, "champion": configured.champion, "challenger": configured.challenger}
    registry = RegistryClient.from_settings(settings)
    name = settings.mlflow.registered_model
    champion = registry.get_alias("champion")
    if configured.champion is not None:
        refs["champion"] = configured.champion
    elif champion is not None:
        refs["champion"] = EngineRef(model=f"models:/{name}@champion", served_name="champion")
    else:
        # Before the first promotion there is no champion; the newest student stands in, so
        # the gateway has a student to route to (it is not promoted by this).
        challenger = registry.get_alias("challenger")
        if challenger is None:
            raise UsageError(
                f"no student in the registry ({name}): run `stillhouse redistill` first "
                "(about 7 minutes on the demo), or set gateway.engines.champion"
            )
        console.print(
            f"no {name}@champion yet: the challenger {challenger.uri} serves in its place"
        )
        return {**refs, "champion": EngineRef(model=challenger.uri, served_name="champion")}
    if configured.challenger is not None:
        refs["challenger"] = configured.challenger
    else:
        # Followed even while unset or equal to the champion: `serve` then leaves it out and
        # adds it once the alias names another version.
        refs["challenger"] = EngineRef(model=f"models:/{name}@challenger", served_name="challenger")
    return refs
