from pathlib import Path

import pytest

from stillhouse.common.config import Settings, env_overrides, load_settings
from stillhouse.common.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stillhouse.yaml"
    path.write_text(text)
    return path


def test_no_config_gives_demo_defaults_with_state_under_dot_stillhouse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.state_dir == Path(".stillhouse")
    assert settings.demo_dir == Path(".stillhouse/demo")


def test_yaml_values_are_parsed_into_typed_fields(tmp_path):
    path = write(
        tmp_path,
        "state_dir: /srv/sh\nengine:\n  max_logprobs: 5\n  extra_args: ['--enforce-eager']\n",
    )
    settings = load_settings(path, environ={})
    assert settings.state_dir == Path("/srv/sh")
    assert settings.engine.max_logprobs == 5
    assert settings.engine.extra_args == ("--enforce-eager",)


def test_environment_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "engine:\n  max_logprobs: 5\n")
    env = {
        "STILLHOUSE_ENGINE__MAX_LOGPROBS": "7",
        "STILLHOUSE_ENGINE__EXTRA_ARGS": '["--a", "b"]',
        "STILLHOUSE_STATE_DIR": "/tmp/elsewhere",
        "UNRELATED": "x",
    }
    settings = load_settings(path, environ=env)
    assert settings.engine.max_logprobs == 7
    assert settings.engine.extra_args == ("--a", "b")
    assert settings.state_dir == Path("/tmp/elsewhere")


def test_config_path_can_come_from_the_environment(tmp_path):
    path = write(tmp_path, "engine:\n  port: 8123\n")
    assert load_settings(environ={"STILLHOUSE_CONFIG": str(path)}).engine.port == 8123


def test_env_overrides_build_a_nested_tree():
    assert env_overrides({"STILLHOUSE_A__B__C": "1", "STILLHOUSE_D": "x"}) == {
        "a": {"b": {"c": "1"}},
        "d": "x",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("engine:\n  max_logprobs: -1\n", "engine.max_logprobs"),
        ("engine:\n  port: 99999\n", "engine.port"),
        ("engine:\n  dtype: int4\n", "engine.dtype"),
        ("engine:\n  max_logprob: 5\n", "engine.max_logprob"),  # a typo is not ignored
        ("demo:\n  judge_share: 2\n", "demo.judge_share"),
    ],
)
def test_invalid_field_is_one_line_that_names_the_field(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_invalid_environment_override_names_the_variable_source(tmp_path):
    with pytest.raises(ConfigError, match=r"environment.*engine\.max_model_len"):
        load_settings(write(tmp_path, ""), environ={"STILLHOUSE_ENGINE__MAX_MODEL_LEN": "tiny"})


def test_broken_yaml_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="line 2"):
        load_settings(write(tmp_path, "engine:\n\tport: 1\n"), environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"), environ={})


def test_secrets_never_show_in_repr_or_dump(tmp_path):
    settings = load_settings(
        write(tmp_path, ""), environ={"STILLHOUSE_ENGINE__API_KEY": "sk-very-secret"}
    )
    assert settings.engine.api_key is not None
    assert settings.engine.api_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(settings)
    assert "sk-very-secret" not in settings.model_dump_json()


def test_gateway_secrets_share_the_prefix_but_are_not_config_overrides():
    from stillhouse.common.config import load_settings

    env = {"STILLHOUSE_API_KEYS": "sk-a,sk-b", "STILLHOUSE_ADMIN_KEY": "sk-admin"}
    settings = load_settings(None, env)
    assert settings.gateway.api_keys_env == "STILLHOUSE_API_KEYS"
    assert "sk-a" not in repr(settings)
