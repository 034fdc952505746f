"""The `stillhouse` command as a user runs it: a subprocess, from a directory of its own."""

import subprocess
import sys
from pathlib import Path

import stillhouse


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "stillhouse", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_help_lists_the_subcommands(tmp_path):
    result = run(["--help"], tmp_path)
    assert result.returncode == 0
    for word in ("version", "engines", "demo"):
        assert word in result.stdout


def test_version_prints_the_package_version(tmp_path):
    result = run(["version"], tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"stillhouse {stillhouse.__version__}"


def test_invalid_config_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "stillhouse.yaml").write_text("engine:\n  max_logprobs: lots\n")
    result = run(["engines", "serve", "--model", "x"], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "engine.max_logprobs" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_model_path_is_one_line_and_exit_2(tmp_path):
    result = run(["engines", "serve", "--model", str(tmp_path / "nope")], tmp_path)
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_package_installs_under_stillhouse_only(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-c", "import stillhouse.eval, stillhouse.serving, stillhouse.rollout"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bare = subprocess.run(
        [sys.executable, "-c", "import eval"], cwd=tmp_path, capture_output=True, text=True
    )
    assert bare.returncode != 0
    assert "No module named 'eval'" in bare.stderr


def test_schedule_with_an_invalid_cron_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "stillhouse.yaml").write_text("schedule:\n  cron: '61 2 * * 0'\n")
    result = run(["schedule"], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "minute" in lines[0], result.stderr


def test_registry_list_on_an_empty_registry_says_so(tmp_path):
    result = run(["registry", "list"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no versions of stillhouse-student yet" in result.stdout


SERVE_CONFIG = """\
state_dir: {state}
gateway:
  host: {host}
  port: {port}
  engines:
    teacher: {{base_url: "http://127.0.0.1:9/v1"}}
    champion: {{base_url: "http://127.0.0.1:9/v1"}}
"""


def _serve(tmp_path: Path, host: str, port: int):
    import os

    config = tmp_path / "stillhouse.yaml"
    config.write_text(SERVE_CONFIG.format(state=tmp_path / "state", host=host, port=port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STILLHOUSE_")}
    return run(["--config", str(config), "serve"], tmp_path, env)


def test_serve_on_a_taken_port_is_one_line_before_any_engine_starts(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = _serve(tmp_path, "127.0.0.1", taken.getsockname()[1])
    assert result.returncode == 2
    assert result.stderr.startswith("error: the gateway cannot listen on 127.0.0.1:")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_serve_beyond_loopback_without_client_keys_is_refused(tmp_path):
    result = _serve(tmp_path, "0.0.0.0", 0)
    assert result.returncode == 2
    assert "STILLHOUSE_API_KEYS is empty" in result.stderr and "Traceback" not in result.stderr


def test_evaluation_commands_without_traffic_or_with_a_bad_window_are_one_line(tmp_path):
    for args, expected in (
        (["ab"], "no traffic log"),
        (["drift", "--since", "2h"], "no traffic log"),
        (["report"], "no traffic log"),
        (["ab", "--since", "yesterday"], "--since 'yesterday'"),
    ):
        result = run(args, tmp_path)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_rollout_pause_queues_the_request_for_the_controller(tmp_path):
    from stillhouse.common.config import Settings
    from stillhouse.rollout.controller.store import ControllerStore

    result = run(["rollout", "pause", "--reason", "incident 42"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "pause queued for the rollout controller" in result.stdout
    controller_dir = Settings(state_dir=tmp_path / ".stillhouse").controller_dir
    _, request = ControllerStore.open(controller_dir).waiting_request()
    assert (request.command, request.reason) == ("pause", "incident 42")
    assert request.actor.startswith("admin:")
    unknown = run(["rollout", "restart"], tmp_path)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr


def test_rollout_pause_with_an_unusable_state_dir_is_one_line(tmp_path):
    (tmp_path / "blocker").write_text("")  # a file where the state dir should be
    (tmp_path / "stillhouse.yaml").write_text(f"state_dir: {tmp_path / 'blocker'}\n")
    result = run(["rollout", "pause"], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "cannot create" in result.stderr
