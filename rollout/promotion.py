"""Promotion and rollback in the MLflow registry, with the audit trail the registry lacks.

    stillhouse promote 7        # admin: version 7 becomes `champion`
    stillhouse rollback         # admin: `champion` goes back to `previous-champion`

MLflow keeps no alias history, so every move is recorded twice: as tags on the version
(`stillhouse.promotion.*`, `stillhouse.rollback.*`, `stillhouse.rollout.*`) and as one MLflow
run (`promote-v7`, `rollback-v7`, `rollout-rollback-v7`). Every function is safe to run again
after a crash part-way (aliases, then the run, then the tags, the timestamp tag last; see
docs/rollout.md, Promotion and rollback).
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from stillhouse.common.errors import StillhouseError
from stillhouse.common.registry import RegistryClient, VersionInfo
from stillhouse.common.roles import Alias
from stillhouse.common.rollout_tags import OUTCOME_TAG, PROMOTED, ROLLED_BACK, rolled_back
from stillhouse.common.tracking import MAX_PARAM_VALUE, RunTracker

MAX_TAG_VALUE = 5000  # MLflow's limit on a model-version tag value (reasons are cut to fit)


class PromotionError(StillhouseError):
    """A promotion or rollback cannot be done as asked; one line says why."""


@dataclass(frozen=True)
class PromotionRecord:
    """What a promotion or rollback did (or found already done: `already`)."""

    action: str  # "promote" | "rollback" | "challenger-rollback"
    version: int  # the new champion, the demoted champion, or the rolled-back challenger
    from_version: int | None  # the champion it replaced / the one restored / None
    actor: str
    reason: str
    at: datetime
    metrics: dict[str, float] = field(default_factory=dict, hash=False)
    run_id: str | None = None
    already: bool = False

    def summary_line(self) -> str:
        done = " (already recorded; nothing changed)" if self.already else ""
        frm = "none" if self.from_version is None else f"v{self.from_version}"
        if self.action == "promote":
            what = f"v{self.version} is champion (was {frm})"
        elif self.action == "rollback":
            what = f"champion rolled back from v{self.version} to {frm}"
        else:
            what = f"challenger v{self.version} rolled back (aliases untouched)"
        return f"{what} by {self.actor}: {self.reason}{done}"


def admin_actor(user: str | None = None) -> str:
    """The `by` of a change made by hand: `admin:<login>`."""
    return f"admin:{user or getpass.getuser()}"


def controller_actor(step: str) -> str:
    """The `by` of a controller decision: `controller:ramp-4/4`."""
    return f"controller:{step}"


def _when(at: datetime | float | None) -> datetime:
    if at is None:
        return datetime.now(UTC)
    if isinstance(at, datetime):
        return at.astimezone(UTC)
    return datetime.fromtimestamp(at, UTC)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


def _key(name: str) -> str:
    # Gate names come from another module; MLflow keys allow only these characters.
    return re.sub(r"[^\w.\-/ ]", "_", name)


def _clip(text: str, limit: int = MAX_TAG_VALUE) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int_tag(info: VersionInfo, key: str) -> int | None:
    value = info.tags.get(key, "")
    return int(value) if value.isdigit() else None


def _log_run(
    tracker: RunTracker,
    name: str,
    job: str,
    version: int,
    params: Mapping[str, str],
    metrics: Mapping[str, float],
) -> str:
    tags = {"stillhouse.job": job, "stillhouse.version": str(version)}
    with tracker.run(name, tags) as run:
        run.log_params({k: _clip(v, MAX_PARAM_VALUE) for k, v in params.items()})
        if metrics:
            run.log_metrics({_key(k): v for k, v in metrics.items()})
        return run.run_id


def _gate_tags(prefix: str, metrics: Mapping[str, float]) -> dict[str, str]:
    """`<prefix>.gate.<name>` per number; the gates' own keys already start with `gate.`."""
    return {
        f"{prefix}.gate.{_key(k.removeprefix('gate.'))}": f"{v:.6g}" for k, v in metrics.items()
    }


def promote(
    registry: RegistryClient,
    tracker: RunTracker,
    version: int,
    *,
    actor: str,
    reason: str,
    metrics: Mapping[str, float] | None = None,
    at: datetime | float | None = None,
) -> PromotionRecord:
    """Make `version` the champion: `previous-champion` → the old champion (if any, and not
    `version`), `champion` → `version`, and `challenger` dropped if it pointed at `version` (a
    different challenger keeps its alias: its own rollout is not this decision). Records tags
    `stillhouse.promotion.{at,by,from_version,reason,run_id,gate.*}` and
    `stillhouse.rollout.outcome=promoted` on the version, and an MLflow run `promote-v{version}`.
    A version already champion with a promotion record is a no-op (`already=True`)."""
    when, gates = _when(at), dict(metrics or {})
    info = registry.resolve_version(version)  # a missing version fails here, before any change
    champion = registry.get_alias(Alias.CHAMPION)
    if champion is not None and champion.version == version:
        if info.tags.get("stillhouse.promotion.at"):
            return PromotionRecord(
                "promote",
                version,
                _int_tag(info, "stillhouse.promotion.from_version"),
                info.tags.get("stillhouse.promotion.by", actor),
                info.tags.get("stillhouse.promotion.reason", reason),
                datetime.fromisoformat(info.tags["stillhouse.promotion.at"]),
                gates,
                info.tags.get("stillhouse.promotion.run_id"),
                already=True,
            )
        # The aliases moved but the record was not finished (a crash), or someone set the alias
        # by hand: previous-champion, set before champion moved, still names the one replaced.
        previous = registry.get_alias(Alias.PREVIOUS_CHAMPION)
        from_version = previous.version if previous and previous.version != version else None
    else:
        from_version = champion.version if champion is not None else None
        if from_version is not None:
            # Before champion moves: see above.
            registry.set_alias(Alias.PREVIOUS_CHAMPION, from_version)
        registry.set_alias(Alias.CHAMPION, version)
    challenger = registry.get_alias(Alias.CHALLENGER)
    if challenger is not None and challenger.version == version:
        registry.delete_alias(Alias.CHALLENGER)
    frm = "none" if from_version is None else str(from_version)
    params = {"from_version": frm, "to_version": str(version), "actor": actor, "reason": reason}
    run_id = _log_run(tracker, f"promote-v{version}", "promotion", version, params, gates)
    tags = {
        "stillhouse.promotion.by": actor,
        "stillhouse.promotion.from_version": frm,
        "stillhouse.promotion.reason": _clip(reason),
        "stillhouse.promotion.run_id": run_id,
        **_gate_tags("stillhouse.promotion", gates),
        OUTCOME_TAG: PROMOTED,
        "stillhouse.rollout.reason": _clip(reason),
        "stillhouse.rollout.by": actor,
        "stillhouse.rollout.at": _iso(when),
        "stillhouse.promotion.at": _iso(when),  # last: its presence means "fully recorded"
    }
    registry.set_version_tags(version, tags)
    return PromotionRecord("promote", version, from_version, actor, reason, when, gates, run_id)


def rollback_champion(
    registry: RegistryClient,
    tracker: RunTracker,
    *,
    actor: str,
    reason: str,
    at: datetime | float | None = None,
) -> PromotionRecord:
    """Point `champion` back at `previous-champion`'s version and drop `previous-champion` (one
    step back per promotion). Tags `stillhouse.rollback.{at,by,reason,to_version,run_id}` on the
    demoted version; MLflow run `rollback-v{demoted}`. Raises PromotionError (one line) when
    there is nothing to go back to."""
    when = _when(at)
    champion = registry.get_alias(Alias.CHAMPION)
    if champion is None:
        raise PromotionError("nothing to roll back: no version holds the `champion` alias")
    previous = registry.get_alias(Alias.PREVIOUS_CHAMPION)
    if previous is None:
        raise PromotionError(
            f"cannot roll back champion v{champion.version}: no version holds "
            "`previous-champion` (none was replaced since the last promotion or rollback)"
        )
    if previous.version == champion.version:
        raise PromotionError(
            f"cannot roll back: `previous-champion` is v{previous.version}, the champion itself"
        )
    demoted, restored = champion.version, previous.version
    registry.set_alias(Alias.CHAMPION, restored)
    registry.delete_alias(Alias.PREVIOUS_CHAMPION)
    params = {
        "from_version": str(demoted),
        "to_version": str(restored),
        "actor": actor,
        "reason": reason,
    }
    run_id = _log_run(tracker, f"rollback-v{demoted}", "rollback", demoted, params, {})
    registry.set_version_tags(
        demoted,
        {
            "stillhouse.rollback.by": actor,
            "stillhouse.rollback.reason": _clip(reason),
            "stillhouse.rollback.to_version": str(restored),
            "stillhouse.rollback.run_id": run_id,
            "stillhouse.rollback.at": _iso(when),
        },
    )
    return PromotionRecord("rollback", demoted, restored, actor, reason, when, {}, run_id)


def moved_by_hand_since(registry: RegistryClient, at: datetime | float) -> str | None:
    """A promotion or rollback made by hand (an `admin:` actor) at or after `at`, described in
    one line; None when there is none. A journaled controller promotion replayed after such a
    move would undo the operator's decision."""
    since = _when(at)
    for info in registry.list_versions():
        for action in ("rollback", "promotion"):
            by = info.tags.get(f"stillhouse.{action}.by", "")
            when = info.tags.get(f"stillhouse.{action}.at")
            if not (by.startswith("admin:") and when):
                continue
            try:
                moved = datetime.fromisoformat(when)
            except ValueError:
                continue
            if moved >= since:
                return f"{action} of v{info.version} by {by} at {when}"
    return None


def record_challenger_rollback(
    registry: RegistryClient,
    tracker: RunTracker,
    version: int,
    *,
    actor: str,
    reason: str,
    metrics: Mapping[str, float] | None = None,
    at: datetime | float | None = None,
) -> PromotionRecord:
    """Record that the challenger `version` was rolled back during its rollout. Aliases are not
    touched (the controller already set its share to 0; the alias says which version was tried
    and keeps it from being tried again). Tags `stillhouse.rollout.{outcome=rolled_back,reason,
    at,by,run_id,gate.*}`; MLflow run `rollout-rollback-v{version}`. With `at` given, a version
    already carrying this exact record is a no-op (`already=True`)."""
    when, gates = _when(at), dict(metrics or {})
    info = registry.resolve_version(version)
    if (
        at is not None
        and rolled_back(info.tags)
        and info.tags.get("stillhouse.rollout.at") == _iso(when)
    ):
        run_id = info.tags.get("stillhouse.rollout.run_id")
        return PromotionRecord(
            "challenger-rollback", version, None, actor, reason, when, gates, run_id, True
        )
    params = {"version": str(version), "actor": actor, "reason": reason}
    name = f"rollout-rollback-v{version}"
    run_id = _log_run(tracker, name, "rollout-rollback", version, params, gates)
    tags = {
        "stillhouse.rollout.reason": _clip(reason),
        "stillhouse.rollout.by": actor,
        "stillhouse.rollout.run_id": run_id,
        **_gate_tags("stillhouse.rollout", gates),
        OUTCOME_TAG: ROLLED_BACK,
        "stillhouse.rollout.at": _iso(when),  # last: its presence means "fully recorded"
    }
    registry.set_version_tags(version, tags)
    return PromotionRecord("challenger-rollback", version, None, actor, reason, when, gates, run_id)
