"""Prometheus recording and alert rules (dashboards/prometheus/rules/) and their promtool unit
tests (dashboards/prometheus/tests/): valid for Prometheus 2.42, every alert labelled and
annotated, and every alert tested both firing and quiet, so a new alert without tests fails here.

promtool comes with Debian's prometheus package, which `make test` installs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboard_queries import (
    ALERT_RULES,
    CATALOGUE,
    DASHBOARD,
    RECORDING_RULES,
    RULE_TESTS_DIR,
    load_rules,
    metric_names,
    recorded_names,
)

from stillhouse.rollout.controller.core import Phase

RULE_FILES = [RECORDING_RULES, ALERT_RULES]
TEST_FILES = sorted(RULE_TESTS_DIR.glob("*.yml"))
SEVERITIES = {"critical", "warning"}
COMPONENTS = {"gateway", "engines", "drift", "ab", "evaluation", "rollout", "redistill"}
# level:metric:operations, https://prometheus.io/docs/practices/rules/
RECORD_NAME = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*:[a-z][a-z0-9_]*$")
# A phase matcher on the controller's phase gauge: phase="ramp" or phase=~"mirror|ramp".
PHASE_MATCHER = re.compile(r'stillhouse_rollout_phase\{[^}]*\bphase\s*=~?\s*\\?"([^"\\]*)')


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: `make test` installs Debian's prometheus package")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=300, check=False)


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in load_rules(ALERT_RULES) if "alert" in rule]


def _rule_tests() -> list[dict[str, Any]]:
    return [
        case
        for path in TEST_FILES
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]
        for case in test.get("alert_rule_test") or []
    ]


def _expr_tests() -> list[str]:
    return [
        case["expr"]
        for path in TEST_FILES
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]
        for case in test.get("promql_expr_test") or []
    ]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_file_passes_promtool_check(path: Path) -> None:
    done = _promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(path: Path) -> None:
    done = _promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_there_are_rule_test_files() -> None:
    assert len(TEST_FILES) >= 2


def test_every_alert_has_a_firing_test_case() -> None:
    fired = {case["alertname"] for case in _rule_tests() if case.get("exp_alerts")}
    missing = sorted({rule["alert"] for rule in _alerts()} - fired)
    assert not missing, f"alerts without a test where they fire: {missing}"


def test_every_alert_has_a_quiet_test_case() -> None:
    quiet = {case["alertname"] for case in _rule_tests() if not case.get("exp_alerts")}
    missing = sorted({rule["alert"] for rule in _alerts()} - quiet)
    assert not missing, f"alerts without a test where they stay quiet: {missing}"


def test_tests_name_only_existing_alerts() -> None:
    names = {rule["alert"] for rule in _alerts()}
    unknown = sorted({case["alertname"] for case in _rule_tests()} - names)
    assert not unknown


def test_every_alert_has_severity_component_and_annotations() -> None:
    alerts = _alerts()
    assert len({rule["alert"] for rule in alerts}) == len(alerts)
    for rule in alerts:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["labels"]["component"] in COMPONENTS, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key, "").strip(), (rule["alert"], key)


def test_required_alerts_exist() -> None:
    names = {rule["alert"] for rule in _alerts()}
    assert {
        "StillhouseStudentDrift",
        "StillhouseFallbackRateSpike",
        "StillhouseSampleRatioMismatch",
        "StillhouseEngineDown",
        "StillhouseCircuitOpen",
        "StillhouseGatewayErrorRate",
        "StillhouseGatewayDown",
        "StillhouseRedistillFailed",
        "StillhouseRedistillMissed",
        "StillhouseEvaluationStale",
    } <= names


def test_recording_rule_names_follow_level_metric_operations() -> None:
    for name in recorded_names():
        assert RECORD_NAME.match(name), name


def test_every_recording_rule_is_checked_by_a_promql_test() -> None:
    tested = set().union(*(metric_names(expr) for expr in _expr_tests()))
    missing = sorted(recorded_names() - tested)
    assert not missing, f"recording rules without a promql_expr_test: {missing}"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rules_read_only_catalogued_or_recorded_series(path: Path) -> None:
    known = CATALOGUE | recorded_names()
    for rule in load_rules(path):
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, (rule.get("alert") or rule.get("record"), unknown)


def test_every_phase_the_rules_and_the_dashboard_match_is_a_controller_phase() -> None:
    """The controller exports its Phase values as `phase` labels; a matcher on any other value
    (the mirror phase's old name "shadow", say) would never match, and its alert never fire."""
    texts = [path.read_text(encoding="utf-8") for path in [*RULE_FILES, *TEST_FILES, DASHBOARD]]
    matched = {
        value
        for text in texts
        for found in PHASE_MATCHER.findall(text)
        for value in found.split("|")
    }
    assert {"mirror", "ramp"} <= matched
    assert matched <= {p.value for p in Phase}
