"""`stillhouse up --with-prometheus`: the shipped scrape config rendered for this session."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from stillhouse.cli.local_prometheus import (
    ENGINES_JOB,
    GATEWAY_JOB,
    ROLLOUT_JOB,
    dashboards_dir,
    prepare_local_prometheus,
    render_config,
)
from stillhouse.common.errors import UsageError

SHIPPED = dashboards_dir() / "prometheus" / "prometheus.yml"


def _template() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def _jobs(config: dict) -> dict[str, dict]:
    return {j["job_name"]: j for j in config["scrape_configs"]}


def test_the_shipped_config_has_the_three_jobs_the_dashboard_selects_on():
    assert set(_jobs(_template())) == {GATEWAY_JOB, ENGINES_JOB, ROLLOUT_JOB}
    assert _jobs(_template())[ROLLOUT_JOB]["honor_labels"] is True  # keeps job="ab"/"drift"


def test_render_points_every_job_at_this_sessions_ports_and_makes_rules_absolute(tmp_path):
    config = render_config(
        _template(), gateway="127.0.0.1:8123", controller="127.0.0.1:9999", rules_dir=tmp_path
    )
    jobs = _jobs(config)
    assert jobs[GATEWAY_JOB]["static_configs"] == [{"targets": ["127.0.0.1:8123"]}]
    assert jobs[ENGINES_JOB]["http_sd_configs"][0]["url"] == (
        "http://127.0.0.1:8123/metrics/engines"
    )
    assert jobs[ROLLOUT_JOB]["static_configs"] == [{"targets": ["127.0.0.1:9999"]}]
    assert config["rule_files"] == [str(tmp_path / "recording.yml"), str(tmp_path / "alerts.yml")]
    assert _jobs(_template())[GATEWAY_JOB]["static_configs"] != jobs[GATEWAY_JOB]["static_configs"]


def test_render_without_controller_metrics_drops_its_job(tmp_path):
    config = render_config(_template(), gateway="h:1", controller=None, rules_dir=tmp_path)
    assert set(_jobs(config)) == {GATEWAY_JOB, ENGINES_JOB}


def test_render_of_a_config_missing_a_job_is_one_clear_error(tmp_path):
    with pytest.raises(UsageError, match="no scrape job 'stillhouse-gateway'"):
        render_config({"scrape_configs": []}, gateway="h:1", controller=None, rules_dir=tmp_path)


def test_the_rendered_config_passes_promtool_check_config(tmp_path: Path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs Debian's prometheus package"
    argv = prepare_local_prometheus(
        tmp_path, gateway="127.0.0.1:8000", controller="127.0.0.1:9401", listen="127.0.0.1:9090"
    )
    assert argv is not None
    config_file = tmp_path / "prometheus" / "prometheus.yml"
    assert f"--config.file={config_file.resolve()}" in argv
    assert "--web.listen-address=127.0.0.1:9090" in argv
    done = subprocess.run(
        [promtool, "check", "config", str(config_file)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_a_taken_prometheus_port_is_one_clear_error_before_anything_starts(tmp_path: Path):
    assert shutil.which("prometheus"), "make test installs Debian's prometheus"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"127.0.0.1:{port}.*--prometheus-port"):
            prepare_local_prometheus(
                tmp_path, gateway="127.0.0.1:8000", controller=None, listen=f"127.0.0.1:{port}"
            )
    assert not (tmp_path / "prometheus").exists()


def test_without_the_shipped_config_it_says_where_it_looked(tmp_path: Path, monkeypatch):
    import stillhouse.cli.local_prometheus as lp

    assert shutil.which("prometheus"), "make test installs Debian's prometheus"
    monkeypatch.setattr(lp, "dashboards_dir", lambda: tmp_path / "site-packages" / "dashboards")
    with pytest.raises(UsageError, match=r"no scrape config at .*source checkout"):
        lp.prepare_local_prometheus(
            tmp_path, gateway="127.0.0.1:8000", controller=None, listen="127.0.0.1:0"
        )
