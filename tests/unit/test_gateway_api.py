"""The gateway's HTTP surface: bad input, keys, admin A/B, health, metrics, strict logging."""

from __future__ import annotations

import random

import httpx
import pytest
from gateway_harness import ADMIN_KEY, CLIENT_KEY, gateway_harness

from stillhouse.common.traffic import TrafficLogReader

MSG = [{"role": "user", "content": "hello"}]
OK = {"model": "stillhouse", "messages": MSG}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    state = tmp_path_factory.mktemp("gw")
    with gateway_harness(state, ("teacher", "champion", "challenger"), max_body_bytes=4096) as h:
        yield h


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


BAD_CHAT = [
    ({**OK, "messages": []}, "messages"),
    ({**OK, "messages": "hi"}, "messages"),
    ({**OK, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({**OK, "messages": [{"role": "user"}]}, "messages[0].content"),
    ({**OK, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({**OK, "max_tokens": 0}, "max_tokens"),
    ({**OK, "max_tokens": "10"}, "max_tokens"),
    ({**OK, "max_tokens": 10**9}, "max_tokens"),
    ({**OK, "temperature": 3}, "temperature"),
    ({**OK, "temperature": "hot"}, "temperature"),
    ({**OK, "top_p": 0}, "top_p"),
    ({**OK, "n": 2}, "n"),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**OK, "top_logprobs": 3}, "top_logprobs"),
    ({**OK, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({**OK, "user": 7}, "user"),
    ({**OK, "stream": "yes"}, "stream"),
    ({**OK, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**OK, "frobnicate": 1}, "frobnicate"),
    ({"messages": MSG}, "model"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT)
def test_bad_chat_requests_are_400_naming_the_parameter(gw, body, param):
    error = _error(gw.post("/v1/chat/completions", body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "stillhouse", "prompt": ""}, "prompt"),
        ({"model": "stillhouse", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "stillhouse", "prompt": "x", "logprobs": True}, "logprobs"),
        ({"model": "stillhouse", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "stillhouse", "prompt": "x", "best_of": 3}, "best_of"),
    ],
)
def test_bad_completion_requests_are_400(gw, body, param):
    assert _error(gw.post("/v1/completions", body), 400)["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_a_body_that_is_not_a_json_object_is_400(gw, raw):
    resp = gw.post("/v1/chat/completions", raw, headers={"content-type": "application/json"})
    _error(resp, 400)


def test_an_unknown_model_is_404_model_not_found(gw):
    error = _error(gw.post("/v1/chat/completions", {**OK, "model": "gpt-9"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_a_body_over_the_limit_is_413(gw):
    big = {**OK, "messages": [{"role": "user", "content": "x" * 10_000}]}
    _error(gw.post("/v1/chat/completions", big), 413)


def test_unknown_paths_and_methods_are_4xx_in_openai_shape(gw):
    _error(gw.post("/v1/embeddings", OK), 404)
    _error(httpx.get(gw.url + "/v1/chat/completions", timeout=10), 405)


@pytest.mark.parametrize("key", [None, "sk-wrong", CLIENT_KEY + "x", ADMIN_KEY])
def test_requests_without_a_valid_client_key_are_401(gw, key):
    error = _error(gw.post("/v1/chat/completions", OK, key=key), 401)
    assert error["code"] == "invalid_api_key"
    assert (key or "<none>") not in error["message"]


def test_every_configured_client_key_works(gw):
    assert gw.post("/v1/chat/completions", OK, key="sk-other").status_code == 200


def test_bad_input_is_recorded_and_never_reaches_an_engine(gw):
    before = sum(len(b.requests) for b in gw.engines.values())
    gw.post("/v1/chat/completions", {**OK, "n": 5}, headers={"x-request-id": "bad-input-1"})
    assert sum(len(b.requests) for b in gw.engines.values()) == before
    record = gw.record("bad-input-1")
    assert record.status == 400 and record.served_by == "none"


def test_models_health_and_readiness(gw):
    models = gw.client().models.list()
    assert [m.id for m in models.data] == ["stillhouse"]
    assert httpx.get(gw.url + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = httpx.get(gw.url + "/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json()["engines"]["challenger"] == {"up": True, "circuit": "closed"}


def test_metrics_exports_the_documented_families_with_bounded_labels(gw):
    gw.post("/v1/chat/completions", {**OK, "user": "metrics-user"})
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    for family in (
        "stillhouse_gateway_requests_total",
        "stillhouse_gateway_request_duration_seconds_bucket",
        "stillhouse_gateway_overhead_seconds_bucket",
        "stillhouse_gateway_fallbacks_total",
        "stillhouse_gateway_confidence_bucket",
        "stillhouse_gateway_circuit_state",
        "stillhouse_shadow_queue_depth",
        "stillhouse_shadow_dropped_total",
        "stillhouse_traffic_log_write_errors_total",
        "stillhouse_traffic_log_pending_records",
    ):
        assert family in text, family
    assert "metrics-user" not in text and CLIENT_KEY not in text and "_created" not in text


def test_metrics_engines_answers_prometheus_http_sd_with_each_engine_and_its_role(gw):
    reply = httpx.get(gw.url + "/metrics/engines", timeout=10)
    assert reply.status_code == 200
    groups = {g["labels"]["model_role"]: g for g in reply.json()}
    assert set(groups) == {"teacher", "champion", "challenger"}
    for role, group in groups.items():
        base_url = gw.gateway.router.engines[role].base_url  # http://127.0.0.1:PORT/v1
        assert group["targets"] == [base_url.removeprefix("http://").removesuffix("/v1")]
        assert group["labels"]["__metrics_path__"] == "/metrics"
        assert group["labels"]["__scheme__"] == "http"


def test_admin_needs_the_admin_key(gw):
    _error(gw.post("/admin/ab", {"challenger_share": 0.5}, key=CLIENT_KEY), 401)
    _error(gw.post("/admin/ab", {"challenger_share": 1.5}, key=ADMIN_KEY), 400)
    _error(gw.post("/admin/ab", {"share": 0.5}, key=ADMIN_KEY), 400)


def test_raising_the_share_keeps_every_challenger_and_is_recorded(gw):
    users = [f"user-{i}" for i in random.Random(7).sample(range(10**6), 300)]

    def arms() -> dict[str, str]:
        out = {}
        for user in users:
            resp = gw.post("/v1/completions", {"model": "stillhouse", "prompt": "x",
                                               "max_tokens": 1, "user": user})  # fmt: skip
            out[user] = resp.headers["x-stillhouse-arm"]
        return out

    previous: set[str] = set()
    for share in (0.05, 0.25, 0.5):
        resp = gw.post("/admin/ab", {"challenger_share": share, "actor": "test"}, key=ADMIN_KEY)
        assert resp.json()["challenger_share"] == share
        challengers = {u for u, arm in arms().items() if arm == "challenger"}
        assert previous <= challengers  # nobody moved back
        assert abs(len(challengers) / len(users) - share) < 0.08
        assert arms() == {u: ("challenger" if u in challengers else "champion") for u in users}
        previous = challengers
    with TrafficLogReader(gw.settings.traffic_log_path) as reader:
        changes = [c for c in reader.ab_changes() if c.actor == "test"]
    assert [c.share for c in changes] == [0.05, 0.25, 0.5]
    assert changes[1].previous_share == 0.05
    gw.post("/admin/ab", {"challenger_share": 0.0}, key=ADMIN_KEY)


def test_the_user_header_pins_the_arm_when_the_body_has_no_user(gw):
    gw.post("/admin/ab", {"challenger_share": 0.5}, key=ADMIN_KEY)
    arms = {
        gw.post("/v1/chat/completions", OK, headers={"x-stillhouse-user": "hdr-1"}).headers[
            "x-stillhouse-arm"
        ]
        for _ in range(5)
    }
    gw.post("/admin/ab", {"challenger_share": 0.0}, key=ADMIN_KEY)
    assert len(arms) == 1


def test_without_an_admin_key_the_admin_api_is_403(tmp_path):
    from fake_vllm import loop_thread
    from gateway_harness import settings_for

    from stillhouse.serving.gateway.app import build_app
    from stillhouse.serving.gateway.parts import EngineEndpoint

    with loop_thread() as lt:
        ep = EngineEndpoint("http://127.0.0.1:9/v1", "x", "x")
        app = build_app(settings_for(tmp_path), {"teacher": ep, "champion": ep}, {})
        url = lt.serve(app)
        resp = httpx.get(url + "/admin/ab", headers={"authorization": "Bearer x"}, timeout=10)
        assert _error(resp, 403)["type"] == "permission_error"
        ready = httpx.get(url + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["ready"] is False


def test_strict_mode_answers_only_after_the_record_is_committed(tmp_path):
    with gateway_harness(tmp_path, traffic_log={"sync": "strict", "flush_interval_ms": 5000}) as h:
        for i in range(3):
            resp = h.post("/v1/chat/completions", OK, headers={"x-request-id": f"strict-{i}"})
            assert resp.status_code == 200
            with TrafficLogReader(h.settings.traffic_log_path) as reader:  # no waiting
                assert f"strict-{i}" in {r.request_id for r in reader.records()}


def test_prompt_logging_can_be_turned_off(tmp_path):
    with gateway_harness(tmp_path, traffic_log={"log_prompts": False}) as h:
        h.post("/v1/chat/completions", OK)
        (record,) = h.records(1)
        assert record.prompt is None and record.answer is None
        assert record.completion_tokens is not None


def test_unparseable_requests_are_one_counted_line_per_interval_not_a_traceback_each():
    import logging

    from aiohttp.http_exceptions import BadHttpMessage

    from stillhouse.serving.gateway.app import MalformedRequestLog

    now = [0.0]
    quiet = MalformedRequestLog(interval_s=60, clock=lambda: now[0])

    def record(exc: BaseException | None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "Error handling", (), info)

    first = record(BadHttpMessage("Invalid header value char"))
    assert quiet.filter(first) and first.exc_info is None
    assert first.getMessage().startswith("answered 400 to 1 malformed HTTP request(s)")
    assert not any(quiet.filter(record(BadHttpMessage("again"))) for _ in range(50))
    now[0] = 61.0
    later = record(BadHttpMessage("later"))
    assert quiet.filter(later) and "51 malformed" in later.getMessage()
    other = record(RuntimeError("a real bug"))
    assert quiet.filter(other) and other.exc_info is not None  # untouched


def test_the_user_hash_is_keyed_with_a_secret_kept_across_restarts(tmp_path):
    import hashlib

    from stillhouse.common.config import Settings
    from stillhouse.serving.gateway.auth import load_user_hash_key

    settings = Settings(state_dir=tmp_path)
    key = load_user_hash_key(settings, {})
    assert len(key) == 64 and load_user_hash_key(settings, {}) == key  # made once, then kept
    path = tmp_path / "secrets" / "user-hash.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_user_hash_key(settings, {"STILLHOUSE_USER_HASH_KEY": "shared"}) == b"shared"

    with gateway_harness(tmp_path / "gw") as h:
        h.post("/v1/chat/completions", {**OK, "user": "alice@example.com"})
        (record,) = h.records(1)
    unsalted = hashlib.sha256(b"alice@example.com").hexdigest()[:16]
    assert record.user_hash and record.user_hash != unsalted


@pytest.mark.parametrize(
    "environ,engine_key,named",
    [
        ({"STILLHOUSE_API_KEYS": "sk-real,change-me-client-key"}, None, "STILLHOUSE_API_KEYS"),
        ({"STILLHOUSE_ADMIN_KEY": "change-me-admin-key"}, None, "STILLHOUSE_ADMIN_KEY"),
        ({}, "change-me-engine-key", "engine.api_key"),
    ],
)
def test_placeholder_secrets_are_refused_at_start_with_one_line(
    tmp_path, environ, engine_key, named
):
    from stillhouse.common.config import Settings
    from stillhouse.common.errors import ConfigError
    from stillhouse.serving.gateway.auth import load_keys

    settings = Settings(state_dir=tmp_path, engine={"api_key": engine_key})
    with pytest.raises(ConfigError, match=f"^{named} still holds a placeholder") as err:
        load_keys(settings, environ)
    assert "\n" not in str(err.value)
