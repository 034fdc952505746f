"""The names every part of Stillhouse shares: engine roles and the registry aliases.

    Role.TEACHER, Role.CHAMPION, Role.CHALLENGER    an engine behind the gateway (and an A/B arm)
    Alias.CHAMPION, Alias.CHALLENGER, Alias.PREVIOUS_CHAMPION    registry aliases the rollout moves

Both are `StrEnum`s, so they compare equal to the plain strings that config files, metric labels,
traffic records and the admin API carry.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """What an engine is to the gateway. The two student roles are also the A/B arms."""

    TEACHER = "teacher"
    CHAMPION = "champion"
    CHALLENGER = "challenger"


ROLES: tuple[Role, ...] = (Role.TEACHER, Role.CHAMPION, Role.CHALLENGER)
STUDENT_ROLES: tuple[Role, ...] = (Role.CHAMPION, Role.CHALLENGER)


class Alias(StrEnum):
    """A registry alias of the student model; `PREVIOUS_CHAMPION` is what a rollback restores."""

    CHAMPION = "champion"
    CHALLENGER = "challenger"
    PREVIOUS_CHAMPION = "previous-champion"
