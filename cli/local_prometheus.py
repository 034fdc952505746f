"""A local Prometheus for `stillhouse up --with-prometheus`: the shipped scrape config
(`dashboards/prometheus/prometheus.yml`) with this session's ports, and the shipped rules.

    stillhouse up --with-prometheus     # then open http://127.0.0.1:9090/targets

The config is rendered into `<state_dir>/prometheus/prometheus.yml` (TSDB beside it), so the
shipped file stays the one reference for job names and labels. Prometheus is Debian's
`prometheus` package (`make test` installs it); without the binary, `up` says so and runs on.
"""

from __future__ import annotations

import copy
import shutil
import socket
from pathlib import Path
from typing import Any

import yaml

import stillhouse
from stillhouse.common.errors import UsageError

GATEWAY_JOB = "stillhouse-gateway"
ENGINES_JOB = "stillhouse-engines"
ROLLOUT_JOB = "stillhouse-rollout"


def dashboards_dir() -> Path:
    """The shipped dashboards, scrape config and rules: the source checkout's `dashboards/`
    (the repository root is the package, installed in editable mode by `make`)."""
    return Path(stillhouse.__file__).resolve().parent / "dashboards"


def _job(config: dict[str, Any], name: str) -> dict[str, Any]:
    for job in config.get("scrape_configs", []):
        if job.get("job_name") == name:
            return job
    raise UsageError(f"the Prometheus config has no scrape job {name!r}")


def render_config(
    template: dict[str, Any], *, gateway: str, controller: str | None, rules_dir: Path
) -> dict[str, Any]:
    """The shipped config pointed at this session: `gateway` and `controller` are host:port
    (controller None: its metrics are off, its job is dropped); rule files made absolute."""
    config = copy.deepcopy(template)
    _job(config, GATEWAY_JOB)["static_configs"] = [{"targets": [gateway]}]
    _job(config, ENGINES_JOB)["http_sd_configs"][0]["url"] = f"http://{gateway}/metrics/engines"
    if controller is None:
        config["scrape_configs"] = [
            j for j in config["scrape_configs"] if j.get("job_name") != ROLLOUT_JOB
        ]
    else:
        _job(config, ROLLOUT_JOB)["static_configs"] = [{"targets": [controller]}]
    config["rule_files"] = [str(rules_dir / Path(f).name) for f in config.get("rule_files", [])]
    return config


def prometheus_command(binary: str, config_path: Path, data_dir: Path, listen: str) -> list[str]:
    return [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address={listen}",
        "--storage.tsdb.retention.time=15d",
    ]


def _check_free(listen: str) -> None:
    """A taken port is one line now, not a Prometheus that `up` restarts until it gives up."""
    host, _, port = listen.rpartition(":")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Prometheus binds
        try:
            probe.bind((host, int(port)))
        except OSError as e:
            raise UsageError(
                f"cannot run Prometheus on {listen}: {e.strerror or e}; pick another "
                "--prometheus-port"
            ) from None


def prepare_local_prometheus(
    state_dir: Path, *, gateway: str, controller: str | None, listen: str
) -> list[str] | None:
    """Write the rendered config and return Prometheus's command line; None without the
    binary."""
    binary = shutil.which("prometheus")
    if binary is None:
        return None
    _check_free(listen)
    shipped = dashboards_dir() / "prometheus"
    if not (shipped / "prometheus.yml").is_file():
        raise UsageError(
            f"no scrape config at {shipped / 'prometheus.yml'}: --with-prometheus runs from a "
            "source checkout (`make` installs it in editable mode); deploy/ has Prometheus "
            "for containers"
        )
    template = yaml.safe_load((shipped / "prometheus.yml").read_text())
    config = render_config(
        template, gateway=gateway, controller=controller, rules_dir=(shipped / "rules").resolve()
    )
    home = (state_dir / "prometheus").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return prometheus_command(binary, config_path, home / "data", listen)
