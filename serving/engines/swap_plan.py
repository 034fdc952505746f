"""What a registry answer asks of the served engines: pure decisions over plain data.

For each student role (champion first, then challenger) the watcher knows what the role serves
now and where its registry reference points; `plan` turns that into one `SwapAction`:

    noop    nothing changed
    retag   same version, new calibration tags: update the threshold in place
    start   another version: start a server for it, then swap routing and retire the old one
    reuse   another version that a running server already serves: swap to that server
    remove  the challenger's alias is gone (or names the champion's version): stop routing to it
    hold    the champion's alias is gone: keep serving what it serves (never left without one)
    wait    starting this version failed a moment ago: retry once the back-off has passed

Roles that are not `swappable` (a fixed version, a `base_url`) only ever get noop or retag.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from stillhouse.common.roles import STUDENT_ROLES, Role

SwapKind = Literal["noop", "retag", "start", "reuse", "remove", "hold", "wait"]
ROLE_ORDER = STUDENT_ROLES  # champion first
RETRY_BASE_S = 30.0
RETRY_MAX_S = 600.0


@dataclass(frozen=True)
class RoleView:
    """One watched role: what it serves and what the registry says now."""

    role: Role
    serving: str | None  # the version served now; None: the role is not routed to
    wanted: str | None  # where its reference points now; None: the alias is unset
    applied_tags: Mapping[str, str] = field(default_factory=dict)  # its threshold's source
    wanted_tags: Mapping[str, str] = field(default_factory=dict)  # the wanted version's
    swappable: bool = True
    extra_args: tuple[str, ...] = ()
    retry: tuple[str, float] | None = None  # (version, not before) after a failed start


@dataclass(frozen=True)
class SwapAction:
    """What to do about one role's engine (the kinds are in the module docstring)."""

    role: Role
    kind: SwapKind
    target: str | None = None  # the version to serve (start, reuse, retag)
    reason: str = ""


def retry_delay(failures: int) -> float:
    """Back-off after `failures` failed starts in a row: 30 s, 60 s, ... up to 10 minutes."""
    return min(RETRY_MAX_S, RETRY_BASE_S * 2 ** max(0, failures - 1))


def plan(
    views: Sequence[RoleView], running: Collection[tuple[str, tuple[str, ...]]], now: float
) -> list[SwapAction]:
    """One action per role, champion first. `running`: the (version, extra args) of servers
    running now; `now` on the clock of `RoleView.retry`."""
    ordered = sorted(views, key=lambda v: ROLE_ORDER.index(v.role) if v.role in ROLE_ORDER else 9)
    actions: list[SwapAction] = []
    champion: str | None = None  # the version the champion will serve after this plan
    for view in ordered:
        action = _plan_role(view, running, now, champion)
        if view.role == Role.CHAMPION:
            champion = action.target if action.kind in ("start", "reuse") else view.serving
        actions.append(action)
    return actions


def _plan_role(
    view: RoleView,
    running: Collection[tuple[str, tuple[str, ...]]],
    now: float,
    champion: str | None,
) -> SwapAction:
    role, wanted = view.role, view.wanted
    if not view.swappable:  # only the threshold follows the registry
        if wanted is None:
            return SwapAction(role, "noop", view.serving, "its registry reference does not resolve")
        if dict(view.wanted_tags) != dict(view.applied_tags):
            return SwapAction(role, "retag", wanted, "calibration tags changed")
        return SwapAction(role, "noop", wanted)
    if wanted is not None and role == Role.CHALLENGER and wanted == champion:
        wanted, why = None, "the challenger alias names the champion's version"
    else:
        why = "the alias is unset"
    if wanted is None:
        if role == Role.CHAMPION:
            return SwapAction(role, "hold", view.serving, f"{why}; keeps serving {view.serving}")
        if view.serving is None:
            return SwapAction(role, "noop", None, why)
        return SwapAction(role, "remove", None, why)
    if wanted == view.serving:
        if dict(view.wanted_tags) != dict(view.applied_tags):
            return SwapAction(role, "retag", wanted, "calibration tags changed")
        return SwapAction(role, "noop", wanted)
    if view.retry is not None and view.retry[0] == wanted and now < view.retry[1]:
        left = view.retry[1] - now
        return SwapAction(role, "wait", wanted, f"its start failed; next try in {left:.0f} s")
    if (wanted, tuple(view.extra_args)) in running:
        return SwapAction(role, "reuse", wanted, "a running server serves it already")
    return SwapAction(role, "start", wanted, f"the alias moved from {view.serving} to {wanted}")
