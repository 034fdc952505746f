"""Engines a killed gateway left behind are stopped by the next gateway on the same state dir,
and only those: a live gateway's engines, and reused pids, are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil

from stillhouse.serving.engines.leftovers import EngineNotes

OWNER = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    from stillhouse.serving.engines.leftovers import EngineNotes
    engine = subprocess.Popen(["sleep", "300"], start_new_session=True)
    EngineNotes(Path(sys.argv[1])).add(engine.pid)
    print(engine.pid, flush=True)
    time.sleep(300)
    """
)


def start_owner(root) -> tuple[subprocess.Popen, int]:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(root)], stdout=subprocess.PIPE, text=True
    )
    return owner, int(owner.stdout.readline())


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_the_engines_of_a_killed_gateway_are_reaped_and_a_live_ones_are_not(tmp_path):
    notes = EngineNotes(tmp_path)
    dead_owner, orphan = start_owner(tmp_path)
    live_owner, kept = start_owner(tmp_path)
    try:
        dead_owner.send_signal(signal.SIGKILL)
        dead_owner.wait(10)
        assert alive(orphan)  # it outlived its gateway
        assert notes.reap_orphans() == [orphan]
        assert not alive(orphan) and alive(kept)
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{kept}.json"]
        assert notes.reap_orphans() == []  # the live gateway's engine stays
    finally:
        for pid in (orphan, kept):
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)
        live_owner.kill()
        live_owner.wait(10)


def test_a_note_whose_process_is_gone_or_unreadable_is_dropped(tmp_path):
    (tmp_path / "1.json").write_text("not json")
    (tmp_path / "2.json").write_text(
        '{"pgid": 999999, "created": 1.0, "owner": 999998, "owner_created": 1.0}'
    )
    assert EngineNotes(tmp_path).reap_orphans() == []
    assert list(tmp_path.iterdir()) == []
