"""Pure helpers over the Grafana dashboard and the Prometheus rules in `dashboards/`.

Shared by the unit tests (structure, promtool syntax) and the integration test that sends every
dashboard query to a live Prometheus:

    dashboard = load_dashboard(DASHBOARD)
    for row, panel, ref_id, expr in panel_queries(dashboard):
        query = substitute(expr)  # ready for GET /api/v1/query?query=...

No network and no third-party imports beyond PyYAML.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
DASHBOARD = DASHBOARDS / "grafana" / "stillhouse.json"
RULES_DIR = DASHBOARDS / "prometheus" / "rules"
RECORDING_RULES = RULES_DIR / "recording.yml"
ALERT_RULES = RULES_DIR / "alerts.yml"
RULE_TESTS_DIR = DASHBOARDS / "prometheus" / "tests"

# Values for Grafana's built-in and dashboard variables when a query leaves Grafana. The rate
# interval must cover at least two scrapes; a live test with a fast scrape can pass a shorter one.
DEFAULT_VARIABLES: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__interval_ms": "30000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "role": ".*",
    "arm": ".*",
    "datasource": "prometheus",
}

# Every series the exporters publish (the issue-7 contract's catalogue). Histograms are listed by
# base name and counters with `_total`, as exposed.
_HISTOGRAMS = (
    "stillhouse_gateway_request_duration_seconds",
    "stillhouse_gateway_time_to_first_token_seconds",
    "stillhouse_gateway_overhead_seconds",
    "stillhouse_gateway_confidence",
    "stillhouse_traffic_log_commit_seconds",
    "vllm:time_to_first_token_seconds",
    "vllm:e2e_request_latency_seconds",
)
_SERIES = (
    "up",
    # gateway
    "stillhouse_gateway_requests_total",
    "stillhouse_gateway_fallbacks_total",
    "stillhouse_gateway_circuit_state",
    "stillhouse_gateway_engine_failures_total",
    "stillhouse_gateway_challenger_share",
    "stillhouse_challenger_mirror_share",
    "stillhouse_mirror_requests_total",
    "stillhouse_engine_swaps_total",
    "stillhouse_shadow_queue_depth",
    "stillhouse_shadow_dropped_total",
    "stillhouse_shadow_scored_total",
    "stillhouse_shadow_errors_total",
    "stillhouse_traffic_log_write_errors_total",
    "stillhouse_traffic_log_pending_records",
    "stillhouse_traffic_log_records_committed_total",
    # evaluation text files
    "stillhouse_eval_last_run_timestamp_seconds",
    "stillhouse_drift_state",
    "stillhouse_divergence_kl",
    "stillhouse_divergence_top1_agreement",
    "stillhouse_drift_cusum_statistic",
    "stillhouse_drift_cusum_threshold",
    "stillhouse_drift_psi",
    "stillhouse_drift_window_records",
    "stillhouse_judge_score_mean",
    "stillhouse_judge_pairwise_win_or_tie_rate",
    "stillhouse_ab_fallback_rate",
    "stillhouse_ab_cost_per_request",
    "stillhouse_ab_savings_fraction",
    "stillhouse_ab_verdict",
    "stillhouse_ab_srm_alarm",
    "stillhouse_ab_srm_p_value",
    "stillhouse_ab_expected_challenger_share",
    # re-distillation text file
    "stillhouse_redistill_last_run_timestamp_seconds",
    "stillhouse_redistill_last_success_timestamp_seconds",
    "stillhouse_redistill_last_failure_timestamp_seconds",
    "stillhouse_redistill_last_run_duration_seconds",
    "stillhouse_redistill_last_run_success",
    "stillhouse_redistill_runs_total",
    # rollout controller
    "stillhouse_rollout_phase",
    "stillhouse_rollout_step",
    "stillhouse_rollout_steps",
    "stillhouse_rollout_challenger_version",
    "stillhouse_rollout_gate_status",
    "stillhouse_rollout_promotions_total",
    "stillhouse_rollout_rollbacks_total",
    "stillhouse_rollout_last_promotion_timestamp_seconds",
    "stillhouse_rollout_last_rollback_timestamp_seconds",
    "stillhouse_rollout_last_tick_timestamp_seconds",
    # vLLM's own
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:request_success_total",
)
CATALOGUE: frozenset[str] = frozenset(
    _SERIES + tuple(f"{h}{suffix}" for h in _HISTOGRAMS for suffix in ("_bucket", "_sum", "_count"))
)

Query = tuple[str, str, str, str]  # (row title, panel title, refId, expr)


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(row title, panel) for every non-row panel, in order. A collapsed row keeps its panels
    under its own `panels`; an expanded row's panels follow it at the top level."""
    row_title = ""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            row_title = panel.get("title", "")
            for nested in panel.get("panels") or []:
                yield row_title, nested
        else:
            yield row_title, panel


def rows(dashboard: Mapping[str, Any]) -> list[str]:
    return [p.get("title", "") for p in dashboard.get("panels", []) if p.get("type") == "row"]


def panel_queries(dashboard: Mapping[str, Any]) -> list[Query]:
    """Every PromQL target of the dashboard: (row title, panel title, refId, expr)."""
    return [
        (row_title, panel.get("title", ""), target.get("refId", ""), target["expr"])
        for row_title, panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """`expr` with Grafana's variables (`$x`, `${x}`, `${x:format}`, `[[x]]`) replaced, so that it
    can go to Prometheus's query API. Defaults: DEFAULT_VARIABLES; an unknown variable raises
    KeyError (a dashboard query naming a variable nobody defines)."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def one(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g is not None)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(one, expr)


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "offset", "bool", "inf", "nan", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "atan2"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a regex reading, enough for our queries):
    strings, label matchers, ranges and grouping label lists are removed first; what is left
    that is neither a function call nor a keyword nor a number is a metric name."""
    text = substitute(expr)
    for pattern in (_STRINGS, _MATCHERS, _RANGES, _LABEL_LISTS):
        text = pattern.sub(" ", text)
    return {m.group(1) for m in _IDENT.finditer(text) if m.group(1).lower() not in _KEYWORDS}


def load_rules(path: Path) -> list[dict[str, Any]]:
    """Every rule of a Prometheus rule file, across its groups."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def recorded_names(path: Path = RECORDING_RULES) -> set[str]:
    return {rule["record"] for rule in load_rules(path) if "record" in rule}
