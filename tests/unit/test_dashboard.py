"""The Grafana dashboard (dashboards/grafana/stillhouse.json): importable, one datasource
variable everywhere, the documented rows in order, every query valid PromQL over catalogued or
recorded series. promtool (Debian's prometheus package, installed by `make test`) checks the
syntax; the live check (every query returns data) is the integration test's."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboard_queries import (
    CATALOGUE,
    DASHBOARD,
    iter_panels,
    load_dashboard,
    metric_names,
    panel_queries,
    recorded_names,
    rows,
    substitute,
)

ROWS = [
    "Traffic & latency",
    "Fallback",
    "Confidence",
    "Judge & A/B",
    "Divergence & drift",
    "Rollout",
    "Re-distillation",
    "vLLM engines",
]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard(DASHBOARD)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: `make test` installs Debian's prometheus package")
    return path


def test_dashboard_is_importable_json_with_fixed_uid(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "stillhouse"
    assert dashboard["title"] == "Stillhouse"
    assert dashboard["schemaVersion"] == 39
    assert dashboard["time"]["from"].startswith("now-")
    assert dashboard["refresh"]
    assert "id" not in dashboard or dashboard["id"] is None  # Grafana assigns it on import


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    ids += [nested["id"] for p in dashboard["panels"] for nested in p.get("panels") or []]
    assert len(ids) == len(set(ids))


def test_panels_fit_the_24_column_grid(dashboard: dict[str, Any]) -> None:
    for _, panel in iter_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]


def test_rows_appear_in_the_documented_order(dashboard: dict[str, Any]) -> None:
    assert rows(dashboard) == ROWS


def test_every_row_has_panels(dashboard: dict[str, Any]) -> None:
    populated = {row for row, _ in iter_panels(dashboard)}
    assert populated == set(ROWS)


def test_templating_has_datasource_role_and_arm_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    role = variables["role"]
    assert role["type"] == "query"
    assert role["datasource"] == DATASOURCE
    assert "label_values(vllm:num_requests_running, model_role)" in role["definition"]
    for name in ("role", "arm"):
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"


def test_every_panel_and_target_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for _, panel in iter_panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_every_panel_says_what_it_answers(dashboard: dict[str, Any]) -> None:
    for _, panel in iter_panels(dashboard):
        assert panel["title"].strip() and len(panel.get("description", "")) > 20, panel["title"]


def test_every_vllm_query_filters_by_the_role_variable(dashboard: dict[str, Any]) -> None:
    for row, title, ref, expr in panel_queries(dashboard):
        if row == "vLLM engines" or "vllm:" in expr:
            assert 'model_role=~"$role"' in expr, (title, ref)


def test_rates_use_grafana_intervals_not_fixed_windows(dashboard: dict[str, Any]) -> None:
    for _, title, ref, expr in panel_queries(dashboard):
        for window in re.findall(r"\b(?:rate|increase|irate)\([^\[]*\[([^\]]+)\]", expr):
            assert window in {"$__rate_interval", "$__range"}, (title, ref, window)


def test_state_panels_map_values_to_words(dashboard: dict[str, Any]) -> None:
    expected = {
        "Drift state per arm": {"-1": "collecting", "0": "ok", "1": "warn", "2": "drift"},
        "Circuit state per engine": {"0": "closed", "1": "half-open", "2": "open"},
        "Gate status (last look)": {"-1": "fail", "0": "inconclusive", "1": "pass"},
        "A/B verdicts (challenger vs champion)": {
            "-1": "worse",
            "0": "inconclusive",
            "1": "better",
        },
    }
    panels = {panel["title"]: panel for _, panel in iter_panels(dashboard)}
    for title, words in expected.items():
        (mapping,) = panels[title]["fieldConfig"]["defaults"]["mappings"]
        assert {k: v["text"] for k, v in mapping["options"].items()} == words, title


def test_current_phase_shows_the_phase_label(dashboard: dict[str, Any]) -> None:
    (panel,) = [p for _, p in iter_panels(dashboard) if p["title"] == "Current phase"]
    (target,) = panel["targets"]
    assert target["expr"] == "stillhouse_rollout_phase == 1"
    assert target["legendFormat"] == "{{phase}}"


def test_every_metric_in_a_query_is_catalogued_or_recorded(dashboard: dict[str, Any]) -> None:
    known = CATALOGUE | recorded_names()
    for _, title, ref, expr in panel_queries(dashboard):
        unknown = metric_names(expr) - known
        assert not unknown, (title, ref, unknown)


def test_every_query_is_valid_promql_for_promtool(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    queries = panel_queries(dashboard)
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": substitute(expr)}
        for i, (_, _, _, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [_promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    index = "\n".join(
        f"query_{i}: {row} / {title} / {ref}" for i, (row, title, ref, _) in enumerate(queries)
    )
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{index}"


# --- the helpers themselves -----------------------------------------------------------------


def test_panel_queries_walks_collapsed_and_expanded_rows() -> None:
    def panel(title: str, expr: str) -> dict[str, Any]:
        return {"type": "stat", "title": title, "targets": [{"refId": "A", "expr": expr}]}

    dashboard = {
        "panels": [
            panel("top", "up"),
            {"type": "row", "title": "open", "collapsed": False, "panels": []},
            panel("a", "x"),
            {"type": "row", "title": "shut", "collapsed": True, "panels": [panel("b", "y")]},
            {"type": "row", "title": "empty", "collapsed": True},
        ]
    }
    assert panel_queries(dashboard) == [
        ("", "top", "A", "up"),
        ("open", "a", "A", "x"),
        ("shut", "b", "A", "y"),
    ]


def test_substitute_replaces_grafana_variables_in_every_syntax() -> None:
    expr = 'sum(rate(m{model_role=~"$role", arm=~"${arm:regex}"}[$__rate_interval])) [[role]]'
    assert substitute(expr) == 'sum(rate(m{model_role=~".*", arm=~".*"}[1m])) .*'
    assert substitute("increase(m[$__range])", {"__range": "15m"}) == "increase(m[15m])"
    assert substitute("x[$__range_s]") == "x[3600]"  # the longer name wins


def test_substitute_rejects_an_unknown_variable() -> None:
    with pytest.raises(KeyError, match="nowhere"):
        substitute("m{a=~'$nowhere'}")


def test_metric_names_ignores_functions_labels_strings_and_numbers() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, arm) (rate(a_bucket{arm=~"$arm"}[5m]))) '
        '/ on (job) group_left b:c:rate5m or label_replace(vector(1e9), "d", "e", "", "") '
        "and time() - c offset 8d"
    )
    assert metric_names(expr) == {"a_bucket", "b:c:rate5m", "c"}
