"""Engines a crashed gateway left behind: each vLLM server `stillhouse serve` starts is noted in
`<state_dir>/engines/<pgid>.json` (its process group, its start time, the gateway that owns
it) and the note removed when it is stopped. A gateway that starts reaps every noted group
whose owner is dead before it starts engines of its own, so a `kill -9` of the gateway costs the
orphans' memory (on a GPU, what the new engines need) only until the restart.

    notes = EngineNotes(settings.state_dir / "engines")
    notes.reap_orphans()      # at start: [pgid, ...] stopped
    notes.add(proc); notes.remove(pid)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import psutil

from stillhouse.serving.engines.vllm import stop_group_id

log = logging.getLogger("stillhouse.serve")

REAP_WAIT_S = 10.0


class EngineNotes:
    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, pid: int) -> None:
        """Note the group led by `pid`, owned by this process."""
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # already gone: nothing to reap later
        self.root.mkdir(parents=True, exist_ok=True)
        note = {"pgid": pid, "created": created, "owner": os.getpid()}
        note["owner_created"] = psutil.Process().create_time()
        (self.root / f"{pid}.json").write_text(json.dumps(note))

    def remove(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{pid}.json").unlink()

    def reap_orphans(self) -> list[int]:
        """Stop every noted group whose owning gateway is gone; returns their process group
        ids. A note whose group is gone too (or was reused by another process) is dropped."""
        reaped = []
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            try:
                note = json.loads(path.read_text())
                pgid, created = int(note["pgid"]), float(note["created"])
                owner, owner_created = int(note["owner"]), float(note["owner_created"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if _same_process(owner, owner_created):
                continue  # its gateway runs (another one on this state dir): not ours
            if _same_process(pgid, created):
                stop_group_id(pgid, REAP_WAIT_S)
                reaped.append(pgid)
            path.unlink(missing_ok=True)
        if reaped:
            log.warning(
                "stopped %d vLLM server(s) a gateway that died had left running (process groups "
                "%s)",
                len(reaped),
                ", ".join(map(str, reaped)),
            )
        return reaped


def _same_process(pid: int, created: float) -> bool:
    """Whether `pid` is still the process created at `created` (not a reused pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - created) < 1.0
    except psutil.Error:
        return False
