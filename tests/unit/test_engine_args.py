from pathlib import Path

import pytest
from pydantic import SecretStr

from stillhouse.common.config import EngineSettings
from stillhouse.common.errors import UsageError
from stillhouse.serving.engines.vllm import (
    EngineSpec,
    build_engine_command,
    build_engine_env,
    free_port,
    read_log_tail,
    validate_model_dir,
)


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_command_starts_the_openai_server_module_with_typed_settings():
    settings = EngineSettings(
        max_model_len=256, max_logprobs=5, dtype="float32", enforce_eager=True
    )
    spec = EngineSpec(Path("/models/teacher"), "teacher")
    cmd = build_engine_command(spec, settings, port=8123, python="/py")
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(cmd, "--model") == "/models/teacher"
    assert _flag(cmd, "--served-model-name") == "teacher"
    assert _flag(cmd, "--port") == "8123"
    assert _flag(cmd, "--host") == "127.0.0.1"
    assert _flag(cmd, "--max-model-len") == "256"
    assert _flag(cmd, "--max-logprobs") == "5"
    assert _flag(cmd, "--dtype") == "float32"
    assert "--enforce-eager" in cmd


def test_passthrough_arguments_come_last_so_they_win():
    settings = EngineSettings(extra_args=("--max-num-seqs", "8"))
    spec = EngineSpec(Path("m"), "m", extra_args=("--seed", "3"))
    cmd = build_engine_command(spec, settings, port=1)
    assert cmd[-4:] == ["--max-num-seqs", "8", "--seed", "3"]
    assert "--enforce-eager" not in cmd


def test_env_carries_cpu_settings_offline_mode_and_the_api_key():
    settings = EngineSettings(cpu_kvcache_space_gib=3, api_key=SecretStr("k"))
    env = build_engine_env(settings, {"PATH": "/bin"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_API_KEY"] == "k"
    assert env["PATH"] == "/bin"


def test_env_respects_an_explicit_caller_value():
    env = build_engine_env(EngineSettings(), {"VLLM_CPU_KVCACHE_SPACE": "8"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "8"


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_missing_or_non_model_paths_fail_before_starting_anything(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        validate_model_dir(tmp_path / "nope")
    with pytest.raises(UsageError, match=r"config\.json"):
        validate_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    validate_model_dir(tmp_path)


def test_log_tail_returns_the_last_lines(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    tail = read_log_tail(log, lines=3)
    assert tail.splitlines() == ["line 97", "line 98", "line 99"]
    assert "no log" in read_log_tail(tmp_path / "missing.log")


def test_an_engine_inherits_only_the_allow_listed_environment():
    parent = {
        "PATH": "/bin",
        "HOME": "/root",
        "LC_ALL": "C.UTF-8",
        "CUDA_VISIBLE_DEVICES": "0",
        "HF_HOME": "/cache",
        "STILLHOUSE_API_KEYS": "sk-client",
        "STILLHOUSE_ADMIN_KEY": "sk-admin",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "MY_TEAM_FLAG": "1",
        "MY_TEAM_OTHER": "2",
    }
    env = build_engine_env(EngineSettings(api_key="sk-engine"), parent)
    assert {"PATH", "HOME", "LC_ALL", "CUDA_VISIBLE_DEVICES", "HF_HOME"} <= set(env)
    assert not {k for k in env if k.startswith(("STILLHOUSE_", "AWS_", "MY_TEAM"))}
    assert env["VLLM_API_KEY"] == "sk-engine"  # its own key, and no other
    widened = build_engine_env(EngineSettings(env_allow=("MY_TEAM_*",)), parent)
    assert {"MY_TEAM_FLAG", "MY_TEAM_OTHER"} <= set(widened)
