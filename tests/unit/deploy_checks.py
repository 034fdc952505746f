"""Checks test_deploy.py runs on deploy/: each tool's own parser or schema (compose-spec,
Kubernetes strict schemas, the typer app, MLflow's CLI, promtool), Settings for STILLHOUSE_*
variables, and what each container listens on and calls."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from deploy_manifests import COMPOSE_DIR, K8S_DIR, REPO, SECRET, Container, scrape

from stillhouse.common.config import (
    CONFIG_ENV,
    NOT_OVERRIDES,
    Settings,
    env_overrides,
    load_settings,
)

K8S_VERSION = "1.34.0"  # the Kubernetes API the manifests are validated against
JOBS = {"stillhouse-gateway", "stillhouse-engines", "stillhouse-rollout"}  # the contract's
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VLLM_PIN = next(
    d.split("==")[1] for d in PYPROJECT["project"]["optional-dependencies"]["cpu"] if "vllm" in d
)


def compose_schema_errors(doc: dict[str, Any]) -> list[str]:
    vendored = resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    schema = json.loads((vendored / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def k8s_errors(doc: dict[str, Any]) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return str(e)
    return None


def parse_stillhouse(argv: list[str]) -> None:
    """Parse argv with the real typer app, down to the leaf command, without running it."""
    import typer.main

    from stillhouse.cli.main import build_app

    command = typer.main.get_command(build_app())
    ctx = command.make_context("stillhouse", list(argv[1:]))
    while hasattr(command, "resolve_command"):  # a group: what is left names a subcommand
        rest = [*ctx._protected_args, *ctx.args]
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)


def settings_from(
    env: dict[str, str], files: dict[str, str], tmp: Path
) -> tuple[Settings, dict[str, Any]]:
    """Settings as the container builds them (its mounted STILLHOUSE_CONFIG file, then its
    variables), and the override paths its variables set."""
    environ = {
        k: ("x" if v == SECRET else v) for k, v in env.items() if k.startswith("STILLHOUSE_")
    }
    unknown_names = [k for k in environ if "__" not in k and k not in NOT_OVERRIDES
                     and k != "STILLHOUSE_STATE_DIR"]  # fmt: skip
    assert not unknown_names, f"not a config section or secret: {unknown_names}"
    config = None
    if CONFIG_ENV in environ:
        assert environ[CONFIG_ENV] in files, f"{environ[CONFIG_ENV]} is not mounted"
        config = tmp / "stillhouse.yaml"
        config.write_text(files[environ[CONFIG_ENV]])
    return load_settings(config, environ), env_overrides(environ)


def override_paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from override_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


KNOWN_PORTS = {"postgres": 5432, "minio/minio": 9000, "prom/prometheus": 9090,
               "grafana/grafana": 3000}  # fmt: skip


def listening_port(c: Container) -> int | None:
    """The port a container serves on, from its own command line or environment."""
    if c.argv[:2] == ["stillhouse", "serve"]:
        return int(c.flag("--port") or c.env.get("STILLHOUSE_GATEWAY__PORT", 8000))
    if c.argv[:2] == ["stillhouse", "controller"]:
        return int(c.env.get("STILLHOUSE_ROLLOUT__CONTROLLER__METRICS_PORT", 9401))
    if c.argv[:2] == ["vllm", "serve"]:
        return int(c.flag("--port") or 8000)
    if c.argv[:2] == ["mlflow", "server"]:
        return int(c.flag("--port") or 5000)
    return KNOWN_PORTS.get(c.repository)


def urls_in(c: Container) -> list[tuple[str, int]]:
    text = " ".join([*c.argv, *c.env.values()])
    return [
        (h, int(p)) for h, p in re.findall(r"https?://(?:[^@/\s]*@)?([a-z][\w.-]*):(\d+)", text)
    ]


def prometheus_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


COMPOSE_PROM = COMPOSE_DIR / "prometheus" / "prometheus.yml"
K8S_PROM = K8S_DIR / "monitoring" / "prometheus.yml"
LOCAL_PROM = REPO / "dashboards" / "prometheus" / "prometheus.yml"


def gateway_sd(engines: dict[str, str], url: str) -> list[dict[str, str]]:
    """The gateway's /metrics/engines answer, as http_sd targets' labels."""
    from stillhouse.serving.gateway.metrics import engine_sd_targets

    return [{"__address__": t, "__meta_url": url, **g["labels"]}
            for g in engine_sd_targets(engines) for t in g["targets"]]  # fmt: skip


def kept(job: dict[str, Any], targets: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    return [t for t in (scrape(job, labels) for labels in targets) if t is not None]


def promtool_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "config", str(config)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
