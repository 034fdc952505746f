"""The downloaded weights of registry versions, `<state_dir>/cache/models/<name>/<version>/`,
and the rule that bounds them: after a swap, each model keeps its newest
`gateway.model_cache_keep` versions and every version still served; the rest are deleted.

    root = models_root(settings)
    prune(root, keep=3, in_use={("stillhouse-student", 7)})   # -> the directories deleted

A version whose weights are gone is downloaded again if it is ever served again, so the rule
can only cost a download, never an answer. (The registry cache's last answers name versions in
use, so a start with MLflow down finds their weights.)
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from stillhouse.common.config import Settings

log = logging.getLogger("stillhouse.model_cache")


def models_root(settings: Settings) -> Path:
    return settings.state_dir / "cache" / "models"


def to_prune(versions: Iterable[int], in_use: Iterable[int], keep: int) -> list[int]:
    """The versions of one model to delete: all but the newest `keep` and those in use."""
    newest = set(sorted(set(versions), reverse=True)[:keep])
    spared = newest | set(in_use)
    return sorted(v for v in set(versions) if v not in spared)


def prune(root: Path, keep: int, in_use: Iterable[tuple[str, int]]) -> list[Path]:
    """Apply `to_prune` to every model under `root`; returns what was deleted. Hidden entries
    (downloads under way) and names that are no version number are left alone."""
    used: dict[str, set[int]] = {}
    for name, version in in_use:
        used.setdefault(name, set()).add(version)
    deleted: list[Path] = []
    if not root.is_dir():
        return deleted
    for model in sorted(p for p in root.iterdir() if p.is_dir()):
        versions = [int(p.name) for p in model.iterdir() if p.is_dir() and p.name.isdigit()]
        for version in to_prune(versions, used.get(model.name, ()), keep):
            path = model / str(version)
            try:
                shutil.rmtree(path)
            except OSError as exc:  # in use by something we do not know of: next time
                log.warning("cannot delete the cached weights %s: %s", path, exc)
                continue
            deleted.append(path)
    if deleted:
        log.info("model cache: deleted %s", ", ".join(str(p) for p in deleted))
    return deleted
