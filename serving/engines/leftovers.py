"""Engines a crashed gateway left behind: each vLLM server `stillhouse serve` starts is noted in
`<state_dir>/engines/<pgid>.json` (its process group, its start time, the gateway that owns it,
its port and the fingerprint of its command line and environment) and the note removed when it
is stopped. The next gateway on the state dir re-adopts an orphan that serves exactly what it
wants (same fingerprint: a `kill -9` of the gateway then costs seconds, not a cold start) and
stops every other orphan before it starts an engine of its own (on a GPU, they hold the memory
the new engines need).

    notes = EngineNotes(settings.state_dir / "engines")
    notes.reap_orphans(keep={fingerprint, ...})   # at start: [pgid, ...] stopped
    orphan = notes.claim(fingerprint)             # re-adopt: the orphan's pgid and port, or None
    notes.add(pid, fingerprint, port); notes.remove(pid)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import psutil

from stillhouse.serving.engines.vllm import stop_group_id

log = logging.getLogger("stillhouse.serve")

REAP_WAIT_S = 10.0


@dataclass(frozen=True)
class EngineNote:
    pgid: int
    created: float  # the group leader's start time: a reused pid is not the same process
    owner: int  # the gateway's pid
    owner_created: float
    fingerprint: str = ""  # "": noted before fingerprints, never re-adopted
    port: int = 0

    @classmethod
    def read(cls, path: Path) -> EngineNote | None:
        try:
            note = json.loads(path.read_text())
            return cls(
                int(note["pgid"]),
                float(note["created"]),
                int(note["owner"]),
                float(note["owner_created"]),
                str(note.get("fingerprint", "")),
                int(note.get("port", 0)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @property
    def orphaned(self) -> bool:
        """Its gateway is gone (a live one, maybe another on this state dir, owns it)."""
        return not same_process(self.owner, self.owner_created)

    @property
    def running(self) -> bool:
        return same_process(self.pgid, self.created)


class EngineNotes:
    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, pid: int, fingerprint: str = "", port: int = 0) -> None:
        """Note the group led by `pid`, owned by this process."""
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # already gone: nothing to reap later
        self._write(EngineNote(pid, created, *_me(), fingerprint, port))

    def remove(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{pid}.json").unlink()

    def reap_orphans(self, keep: Collection[str] = ()) -> list[int]:
        """Stop every noted group whose owning gateway is gone, except orphans whose fingerprint
        is in `keep` (this gateway will re-adopt them); returns the stopped process group ids.
        A note whose group is gone too (or was reused by another process) is dropped."""
        reaped = []
        for path, note in self._notes():
            if note is None:
                path.unlink(missing_ok=True)
                continue
            if not note.orphaned:
                continue  # its gateway runs: not ours
            if not note.running:
                path.unlink(missing_ok=True)
            elif not (note.fingerprint and note.fingerprint in keep):
                stop_group_id(note.pgid, REAP_WAIT_S)
                reaped.append(note.pgid)
                path.unlink(missing_ok=True)
        if reaped:
            log.warning(
                "stopped %d vLLM server(s) a gateway that died had left running (process groups "
                "%s)",
                len(reaped),
                ", ".join(map(str, reaped)),
            )
        return reaped

    def claim(self, fingerprint: str) -> EngineNote | None:
        """Take over a running orphan with this fingerprint: it is noted as this process's
        from now on. The rename makes the take-over atomic, so of two gateways starting on
        one state dir only one adopts it."""
        for path, note in self._notes():
            if note is None or note.fingerprint != fingerprint or not fingerprint:
                continue
            if not note.orphaned or not note.running:
                continue
            taken = path.with_name(f"{path.name}.{os.getpid()}.claim")
            try:
                path.rename(taken)
            except FileNotFoundError:
                continue  # another gateway took it first
            adopted = EngineNote(note.pgid, note.created, *_me(), note.fingerprint, note.port)
            self._write(adopted)
            taken.unlink(missing_ok=True)
            log.warning(
                "re-adopted the vLLM server (process group %d, port %d) a gateway that died had "
                "left running",
                note.pgid,
                note.port,
            )
            return adopted
        return None

    def _notes(self) -> list[tuple[Path, EngineNote | None]]:
        paths = sorted(self.root.glob("*.json")) if self.root.is_dir() else []
        return [(path, EngineNote.read(path)) for path in paths]

    def _write(self, note: EngineNote) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{note.pgid}.json.tmp"
        tmp.write_text(note.to_json())
        tmp.replace(self.root / f"{note.pgid}.json")  # a reader never sees half a note


def _me() -> tuple[int, float]:
    return os.getpid(), psutil.Process().create_time()


def same_process(pid: int, created: float) -> bool:
    """Whether `pid` is still the process created at `created` (not a reused pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - created) < 1.0
    except psutil.Error:
        return False
