"""Which engines `stillhouse serve` runs: the configured ones, and for a student role the
config leaves unset, the registry alias of that name (so the gateway follows it: hot swap).

    refs = engine_refs(settings, RegistryCache.for_settings(settings).at_start(), console.print)

Before the first promotion there is no champion: the newest challenger stands in for it (it is
not promoted by this), so the gateway has a student to route to.
"""

from __future__ import annotations

from collections.abc import Callable

from stillhouse.common.config import EngineRef, Settings
from stillhouse.common.errors import UsageError
from stillhouse.common.registry import alias_uri
from stillhouse.common.roles import Alias, Role
from stillhouse.serving.engines.registry_view import RegistryView


def teacher_ref(settings: Settings) -> EngineRef:
    """The configured teacher engine; its absence is one line saying what to set."""
    teacher = settings.gateway.engines.teacher
    if teacher is None:
        raise UsageError(
            "no teacher engine configured: set gateway.engines.teacher "
            "(a model directory, a models:/ reference, or the base_url of a running engine)"
        )
    return teacher


def engine_refs(
    settings: Settings, registry: RegistryView, say: Callable[[str], object]
) -> dict[Role, EngineRef]:
    """The teacher, the champion and (followed even while unset) the challenger."""
    configured = settings.gateway.engines
    refs = {Role.TEACHER: teacher_ref(settings)}
    if configured.champion is not None and configured.challenger is not None:
        return {**refs, Role.CHAMPION: configured.champion, Role.CHALLENGER: configured.challenger}
    name = settings.mlflow.registered_model

    def follow(alias: Alias) -> EngineRef:
        return EngineRef(model=alias_uri(name, alias), served_name=str(alias))

    if configured.champion is not None:
        refs[Role.CHAMPION] = configured.champion
    elif registry.lookup(alias_uri(name, Alias.CHAMPION)) is not None:
        refs[Role.CHAMPION] = follow(Alias.CHAMPION)
    else:
        challenger = registry.lookup(alias_uri(name, Alias.CHALLENGER))
        if challenger is None:
            raise UsageError(
                f"no student in the registry ({name}): run `stillhouse redistill` first "
                "(about 7 minutes on the demo), or set gateway.engines.champion"
            )
        say(f"no {name}@champion yet: the challenger {challenger.uri} serves in its place")
        stand_in = EngineRef(model=challenger.uri, served_name=str(Role.CHAMPION))
        return {**refs, Role.CHAMPION: stand_in}
    # Followed even while unset or equal to the champion: `serve` then leaves it out and adds
    # it once the alias names another version.
    refs[Role.CHALLENGER] = configured.challenger or follow(Alias.CHALLENGER)
    return refs
