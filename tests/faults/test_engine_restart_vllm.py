"""Case 10: a real vLLM champion, started by a real `stillhouse serve`, killed with SIGKILL under
load: no client sees a failure (the teacher answers meanwhile), the gateway restarts the server
on its port, /admin/engines tells the truth while it does, and traffic returns to it.

The engines run unbound (`cpu_omp_threads_bind: nobind`): vLLM's "auto" binding pins every
engine's worker to core 0 of a two-core machine, where the busy teacher's worker starved the
restarted champion's worker so that it was not ready within its ready timeout (seen twice;
`/admin/engines` then showed `pid: null` while the timed-out try was being stopped)."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from clients import ask
from serve_process import ADMIN_KEY

pytestmark = pytest.mark.slow

CLIENTS = 4
PAUSE_S = 0.25


def champion_process(gp) -> dict:
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    engines = httpx.get(gp.url + "/admin/engines", headers=admin, timeout=10).json()["engines"]
    return engines["champion"]["process"]


def _champion_log_tail(gp, lines: int = 40) -> str:
    """Why a restart was slow, when it was: vLLM's own last lines (a CI run once timed out
    with nothing else to go on)."""
    logs = sorted((gp.state / "logs").glob("engine-champion-*.log"))
    return "\n".join("\n".join(p.read_text(errors="replace").splitlines()[-lines:]) for p in logs)


def test_a_killed_champion_is_restarted_and_no_client_sees_it(
    tiny_world, tiny_settings, teacher_engine, start_gateway
):
    engine = tiny_settings.engine.model_dump(mode="json", exclude={"api_key"})
    engine.update(restart_backoff_s=0.5, cpu_omp_threads_bind="nobind")
    gp = start_gateway(
        top={"demo": {"enabled": False}, "engine": engine},
        engines={
            "teacher": {"base_url": teacher_engine.base_url, "served_name": "teacher"},
            "champion": {"model": str(tiny_world.teacher_dir), "served_name": "champion"},
        },
        # The whole answer (6 tokens) is held before it is sent: a kill mid-answer falls back
        # to the teacher unseen, rather than breaking a stream off.
        confidence={"threshold": -50.0, "hold_tokens": 8},
        fallback={"attempt_timeout_s": 20.0, "breaker_cooldown_s": 2.0},
        shadow={"fraction": 0.0},
        watch_interval_s=0,
        startup_s=engine["ready_timeout_s"],
    )
    before = champion_process(gp)
    assert before["alive"] and before["state"] == "running"
    seen: list = []
    stop = threading.Event()

    def load(i: int) -> None:
        n = 0
        while not stop.is_set():
            seen.append((time.monotonic(), ask(gp.url, stream=(i + n) % 2 == 0, max_tokens=6)))
            n += 1
            # Paced: on two cores an unpaced teacher would starve the restarting server.
            stop.wait(PAUSE_S)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        killed_at = time.monotonic()
        os.kill(before["pid"], signal.SIGKILL)
        deadline = killed_at + engine["ready_timeout_s"] + 30
        restarting_seen = False
        while True:
            process = champion_process(gp)
            restarting_seen |= process["state"] == "restarting"
            back = [t for t, s in seen if t > killed_at and s.served_by == "champion"]
            if process["restarts"] == 1 and process["state"] == "running" and back:
                break
            assert time.monotonic() < deadline, (
                f"not serving again: {process}; load average {os.getloadavg()}; "
                f"the server's log ends:\n{_champion_log_tail(gp)}"
            )
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    back_after_s = (
        min(t for t, s in seen if t > killed_at and s.served_by == "champion") - killed_at
    )
    failed = [s for _, s in seen if s.status != 200 or (s.error is not None)]
    print(f"\nrequests {len(seen)}, failed {len(failed)}, champion back after {back_after_s:.1f} s")
    assert failed == []
    assert restarting_seen  # /admin/engines said so while it was down
    assert process["last_exit"] == -signal.SIGKILL and process["pid"] != before["pid"]
    assert gp.metric('stillhouse_engine_restarts_total{engine="champion",outcome="ok"}') == 1
    assert "exited with code -9; restarting it" in gp.output()
