"""`stillhouse up`'s supervision: restart back-off, giving up, the shared environment."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from stillhouse.cli.up import (
    BACKOFF_S,
    MAX_RESTARTS,
    RESTART_WINDOW_S,
    Child,
    UpError,
    child_commands,
    child_environment,
    restart_delay,
    supervise,
)
from stillhouse.common.config import Settings


@pytest.mark.parametrize(
    ("exits", "now", "expected"),
    [
        ([], 100.0, 0.0),
        ([100.0], 100.0, BACKOFF_S[0]),
        ([98.0, 99.0, 100.0], 100.0, BACKOFF_S[2]),
        ([100.0 - RESTART_WINDOW_S - 1, 100.0], 100.0, BACKOFF_S[0]),  # old exits are forgiven
        ([100.0] * (MAX_RESTARTS + 1), 100.0, None),
    ],
)
def test_restart_delay_backs_off_then_gives_up(exits, now, expected):
    assert restart_delay(exits, now) == expected


def test_a_generated_admin_key_is_shared_and_a_users_key_is_kept():
    settings = Settings()
    env, generated = child_environment(settings, {"PATH": "/bin"}, "http://127.0.0.1:9")
    assert generated and len(env["STILLHOUSE_ADMIN_KEY"]) >= 24
    assert env["STILLHOUSE_ROLLOUT__CONTROLLER__GATEWAY_URL"] == "http://127.0.0.1:9"
    env, generated = child_environment(settings, {"STILLHOUSE_ADMIN_KEY": "mine"}, "http://x:1")
    assert not generated and env["STILLHOUSE_ADMIN_KEY"] == "mine"


def test_child_commands_pass_the_config_and_can_leave_out_the_schedule(tmp_path: Path):
    cfg = tmp_path / "s.yaml"
    with_schedule = child_commands(cfg, 8123, True)
    assert set(with_schedule) == {"gateway", "controller", "schedule"}
    assert with_schedule["gateway"][-3:] == ["serve", "--port", "8123"]
    assert all(["--config", str(cfg)] == argv[3:5] for argv in with_schedule.values())
    assert set(child_commands(None, 1, False)) == {"gateway", "controller"}


def test_supervise_restarts_a_dying_child_then_gives_up(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("stillhouse.cli.up.BACKOFF_S", (0.0,))
    child = Child("flaky", [sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "c.log")
    child.start()
    lines: list[str] = []
    with pytest.raises(UpError, match="flaky exited 6 times"):
        supervise([child], threading.Event(), lines.append, tick_s=0.05)
    assert sum("restarting" in line for line in lines) >= MAX_RESTARTS


def test_supervise_returns_when_stopped_and_leaves_a_healthy_child_alone(tmp_path: Path):
    child = Child("ok", [sys.executable, "-c", "import time; time.sleep(30)"], {},
                  tmp_path / "c.log")  # fmt: skip
    child.start()
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    try:
        supervise([child], stop, lambda line: None, tick_s=0.05)
        assert child.poll() is None and child.exits == []
    finally:
        child.stop(5.0)
    assert child.proc is None
