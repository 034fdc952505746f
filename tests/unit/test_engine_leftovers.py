"""Engines a killed gateway left behind are re-adopted by the next gateway on the same state dir
when they serve what it wants and answer, and stopped otherwise; a live gateway's engines, and
reused pids, are left alone."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import psutil
import pytest

from stillhouse.common.config import EngineSettings
from stillhouse.serving.engines import vllm
from stillhouse.serving.engines.leftovers import EngineNotes
from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine, free_port

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


# An orphan that answers /v1/models like a vLLM server: http.server on a folder with that file.
SERVING_OWNER = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    from stillhouse.serving.engines.leftovers import EngineNotes
    root, site, port, fingerprint = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    engine = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", site],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    EngineNotes(root).add(engine.pid, fingerprint, port)
    print(engine.pid, flush=True)
    time.sleep(300)
    """
)


def orphan_of_killed_owner(root, site, port: int, fingerprint: str) -> int:
    """A server noted by a gateway that was then killed (kill -9): its pid."""
    owner = subprocess.Popen(
        [sys.executable, "-c", SERVING_OWNER, str(root), str(site), str(port), fingerprint],
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = int(owner.stdout.readline())
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    return pid


def wait_answers(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


@pytest.fixture
def model_site(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    site = tmp_path / "site"
    (site / "v1").mkdir(parents=True)
    (site / "v1" / "models").write_text('{"data": [{"id": "champion"}]}')
    return model, site


def test_an_orphan_serving_the_same_model_is_re_adopted_not_restarted(tmp_path, model_site):
    model, site = model_site
    notes = EngineNotes(tmp_path / "engines")
    settings = EngineSettings(stop_grace_s=5)
    engine = VllmEngine(EngineSpec(model, "champion"), settings, tmp_path / "logs", notes=notes)
    port = free_port()
    orphan = orphan_of_killed_owner(notes.root, site, port, engine.fingerprint)
    try:
        wait_answers(f"http://127.0.0.1:{port}/v1/models")
        assert notes.reap_orphans(keep={engine.fingerprint}) == []  # kept for re-adoption
        started = time.monotonic()
        engine.start()
        engine.wait_ready(timeout_s=10)
        assert engine.adopted and engine.pid == orphan
        assert engine.base_url == f"http://127.0.0.1:{port}/v1"
        assert time.monotonic() - started < 5.0  # no cold start
        note = json.loads((notes.root / f"{orphan}.json").read_text())
        assert note["owner"] == os.getpid()  # ours now: the next gateway will not reap it
        assert notes.reap_orphans() == []
        assert notes.claim(engine.fingerprint) is None  # taken once only
        engine.stop()
        assert not alive(orphan)
        assert list(notes.root.glob("*.json")) == []
    finally:
        if alive(orphan):
            os.killpg(orphan, signal.SIGKILL)


def test_an_orphan_serving_something_else_is_reaped_before_any_start(tmp_path, model_site):
    model, site = model_site
    notes = EngineNotes(tmp_path / "engines")
    settings = EngineSettings()
    wanted = VllmEngine(EngineSpec(model, "champion"), settings, tmp_path / "logs", notes=notes)
    other = VllmEngine(EngineSpec(model, "champion", None, ("--seed", "1")), settings, tmp_path)
    assert other.fingerprint != wanted.fingerprint  # other arguments: another server
    orphan = orphan_of_killed_owner(notes.root, site, free_port(), other.fingerprint)
    try:
        assert notes.reap_orphans(keep={wanted.fingerprint}) == [orphan]
        assert not alive(orphan)
        assert notes.claim(other.fingerprint) is None
    finally:
        if alive(orphan):
            os.killpg(orphan, signal.SIGKILL)


def test_an_orphan_that_does_not_answer_is_stopped_and_a_fresh_server_started(
    tmp_path, model_site, monkeypatch
):
    model, _ = model_site
    # The "vLLM server" started in its place: a process that runs until stopped.
    monkeypatch.setattr(vllm, "VLLM_SERVER_MODULE", "stillhouse_test_sleeper")
    (tmp_path / "stillhouse_test_sleeper.py").write_text("import time\ntime.sleep(300)\n")
    environ = {**os.environ, "PYTHONPATH": str(tmp_path)}
    notes = EngineNotes(tmp_path / "engines")
    settings = EngineSettings(stop_grace_s=5)
    engine = VllmEngine(
        EngineSpec(model, "champion"), settings, tmp_path / "logs", environ, notes=notes
    )
    empty = tmp_path / "empty"  # serves 404 for /v1/models: not a healthy engine
    empty.mkdir()
    port = free_port()
    orphan = orphan_of_killed_owner(notes.root, empty, port, engine.fingerprint)
    try:
        wait_answers(f"http://127.0.0.1:{port}/")
        engine.start()
        assert not engine.adopted and engine.pid != orphan
        assert not alive(orphan)
        assert [p.name for p in notes.root.glob("*.json")] == [f"{engine.pid}.json"]
    finally:
        engine.stop()
        if alive(orphan):
            os.killpg(orphan, signal.SIGKILL)
