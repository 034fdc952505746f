"""Prometheus HTTP service discovery of the engines behind the gateway (a pure mapping)."""

from __future__ import annotations

import pytest

from stillhouse.serving.gateway.metrics import engine_sd_targets


@pytest.mark.parametrize(
    ("base_url", "target", "scheme", "path"),
    [
        ("http://127.0.0.1:8101/v1", "127.0.0.1:8101", "http", "/metrics"),
        ("http://vllm-teacher:8000/v1/", "vllm-teacher:8000", "http", "/metrics"),
        ("https://llm.example.com/teacher/v1", "llm.example.com", "https", "/teacher/metrics"),
    ],
)
def test_engine_sd_targets_point_at_vllms_root_metrics_with_the_role_label(
    base_url: str, target: str, scheme: str, path: str
):
    (group,) = engine_sd_targets({"champion": base_url})
    assert group == {
        "targets": [target],
        "labels": {"model_role": "champion", "__scheme__": scheme, "__metrics_path__": path},
    }


def test_engine_sd_targets_one_group_per_role_in_a_stable_order():
    groups = engine_sd_targets(
        {"teacher": "http://h:1/v1", "challenger": "http://h:3/v1", "champion": "http://h:2/v1"}
    )
    assert [g["labels"]["model_role"] for g in groups] == ["challenger", "champion", "teacher"]
    assert engine_sd_targets({}) == []
