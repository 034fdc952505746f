"""One process at a time: per state dir for a long-running job (`stillhouse schedule`, the
controller), or for a build that others wait for (the demo world).

    with instance_lock(path, lambda who: MyLockedError(f"... ({who}) holds {path}")):
        ...

An exclusive flock on `path`, which records the holder's pid. The kernel drops the lock when
the process dies (kill -9 included), so a restart never needs a manual unlock, and the
descriptor is not inherited (Python's default), so no child process can keep it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def instance_lock(
    path: Path,
    locked: Callable[[str], Exception],
    *,
    wait: Callable[[str], object] | None = None,
) -> Iterator[Path]:
    """Hold the lock or raise `locked(who)` at once ("pid 123" or "another process"); with
    `wait`, tell `wait(who)` and block until the holder lets go instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            who = f"pid {holder}" if holder.isdigit() else "another process"
            if wait is None:
                raise locked(who) from None
            wait(who)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing our only descriptor releases the flock
