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


# -- hardening -----------------------------------------------------------------------------


def security_problems(
    where: str, template: dict[str, Any], writable_root: frozenset[str] = frozenset()
) -> list[str]:
    """What a pod template lacks of the hardening every workload must have: pod-level
    RuntimeDefault seccomp; per container (init containers too) no privilege escalation, every
    capability dropped, non-root (pod or container level, and no uid 0), and a read-only root
    filesystem unless its name is in `writable_root`."""
    spec = template["spec"]
    pod = spec.get("securityContext", {})
    found = []
    if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        found.append(f"{where}: no pod-level seccompProfile RuntimeDefault")
    for c in spec.get("initContainers", []) + spec["containers"]:
        name, own = f"{where}:{c['name']}", c.get("securityContext", {})
        merged = {**pod, **own}
        if own.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if own.get("capabilities", {}).get("drop") != ["ALL"] or own["capabilities"].get("add"):
            found.append(f"{name}: capabilities are not drop [ALL]")
        if merged.get("runAsNonRoot") is not True or merged.get("runAsUser") == 0:
            found.append(f"{name}: may run as root")
        if own.get("privileged"):
            found.append(f"{name}: privileged")
        if own.get("readOnlyRootFilesystem") is not True and c["name"] not in writable_root:
            found.append(f"{name}: root filesystem is writable")
    return found


def _image_env(name: str) -> str | None:
    found = re.findall(rf"\b{name}=(\S+)", (REPO / "deploy" / "Dockerfile").read_text())
    return found[-1] if found else None


# HOME as each image sets it (the container's env wins).
IMAGE_HOME = {"stillhouse": _image_env("HOME")}


def writable_mounts(container: dict[str, Any], pod_spec: dict[str, Any]) -> list[str]:
    """Mount paths a container can write to: emptyDirs and claims not mounted read-only
    (a StatefulSet's volumeClaimTemplates are the names the pod's volumes do not list)."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    paths = []
    for m in container.get("volumeMounts", []):
        v = volumes.get(m["name"], {"persistentVolumeClaim": {}})
        kind_ok = "emptyDir" in v or (
            "persistentVolumeClaim" in v and not v["persistentVolumeClaim"].get("readOnly")
        )
        if kind_ok and not m.get("readOnly"):
            paths.append(m["mountPath"])
    return paths


def under(path: str, mounts: Iterable[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def secret_source(c: Container, var: str, raw_compose: dict[str, Any]) -> str | None:
    """The secret an env var is taken from: a k8s secretKeyRef's key, or the compose variable a
    required interpolation (${VAR:?...}) reads. None: a literal, or missing."""
    if c.where.startswith("compose:"):
        svc = raw_compose["services"][c.where.split(":", 1)[1]]
        m = re.fullmatch(r"\$\{(\w+):\?[^}]*\}", str((svc.get("environment") or {}).get(var)))
        return m[1] if m else None
    for item in c.spec.get("env", []):
        if item["name"] == var:
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            return ref["key"] if ref and not ref.get("optional") else None
    return None


def published_hosts(service: dict[str, Any]) -> list[str]:
    """The host addresses a compose service's ports are published on ("0.0.0.0": all)."""
    hosts = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            hosts.append(p.get("host_ip", "0.0.0.0"))
        else:
            parts = str(p).rsplit(":", 2)
            hosts.append(parts[0] if len(parts) == 3 else "0.0.0.0")
    return hosts
