"""The challenger's mirror phase through the running gateway: champion-arm requests mirrored to
the challenger in the background, recorded as `served_by: mirror`, never seen by the user."""

from __future__ import annotations

import time

import httpx
import pytest
from gateway_harness import ADMIN_KEY, gateway_harness

from stillhouse.common.traffic import MIRROR, TrafficLogReader

MSG = [{"role": "user", "content": "my invoice is wrong"}]
ROLES = ("teacher", "champion", "challenger")
MIRRORED = {"challenger_share": 0.0, "mirror_share": 1.0}
CHALLENGER_IDS = [21, 22, 23, 24, 25, 26, 27, 28, 29, 1]


def headers(raw) -> tuple[str, str, str]:
    h = raw.headers
    return h["x-stillhouse-arm"], h["x-stillhouse-served-by"], h["x-stillhouse-fallback"]


def mirrors(gw, n: int, timeout: float = 5.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        got = [r for r in gw.records(0, timeout=0.1) if r.served_by == MIRROR]
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def mirror_count(gw, outcome: str) -> float:
    registry = gw.gateway.metrics.registry
    value = registry.get_sample_value("stillhouse_mirror_requests_total", {"outcome": outcome})
    return value or 0.0


def test_every_champion_request_is_mirrored_and_the_user_never_sees_it(tmp_path):
    with gateway_harness(tmp_path, ROLES, ab=MIRRORED) as gw:
        gw.engines["challenger"].answer_ids = CHALLENGER_IDS
        client = gw.client()
        ids = []
        for i in range(3):
            raw = client.chat.completions.with_raw_response.create(
                model="stillhouse", messages=MSG, max_tokens=6, temperature=0.3, user=f"u{i}"
            )
            assert headers(raw) == ("champion", "champion", "none")
            assert raw.parse().choices[0].message.content.startswith("w11 ")
            ids.append(raw.headers["x-request-id"])
        with client.chat.completions.with_streaming_response.create(
            model="stillhouse", messages=MSG, max_tokens=6, stream=True, user="u-stream"
        ) as raw:
            assert headers(raw) == ("champion", "champion", "none")
            text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
            ids.append(raw.headers["x-request-id"])
        assert text.startswith("w11 ") and "w21" not in text
        got = {r.request_id: r for r in mirrors(gw, 4)}
        originals = {r.request_id: r for r in gw.records(8) if r.served_by != MIRROR}
        assert set(got) == {f"{i}:mirror" for i in ids}
        for request_id in ids:
            m, o = got[f"{request_id}:mirror"], originals[request_id]
            assert (m.arm, m.served_by, m.status, m.stream) == ("challenger", MIRROR, 200, False)
            assert m.user_hash == o.user_hash and m.student_model == "ref-challenger"
            assert m.fallback_reason is None and m.confidence == pytest.approx(-0.01)
            assert m.answer.startswith("w21 ") and m.completion_tokens == 6
            assert m.prompt == o.prompt and m.latency_s > 0
            assert (o.arm, o.served_by) == ("champion", "champion")
        calls = gw.engines["challenger"].requests
        assert len(calls) == 4 and not any(c.get("stream") for c in calls)
        assert all(c["logprobs"] is True and c["top_logprobs"] == 5 for c in calls)
        assert calls[0]["temperature"] == 0.3 and "stream_options" not in calls[-1]
        assert mirror_count(gw, "ok") == 4
        assert gw.engines["teacher"].requests == []


def test_a_champion_fallback_is_mirrored_too(tmp_path):
    with gateway_harness(tmp_path, ROLES, ab=MIRRORED) as gw:
        gw.engines["champion"].logprob = -2.0
        raw = gw.client().chat.completions.with_raw_response.create(
            model="stillhouse", messages=MSG, max_tokens=6
        )
        assert headers(raw) == ("champion", "teacher", "low_confidence")
        (m,) = mirrors(gw, 1)
        assert m.request_id == raw.headers["x-request-id"] + ":mirror"
        assert m.fallback_reason is None and m.answer


def test_without_a_mirror_share_nothing_is_mirrored(tmp_path):
    with gateway_harness(tmp_path, ROLES, ab={"challenger_share": 0.0}) as gw:
        for _ in range(3):
            gw.client().chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
        assert len(gw.records(3)) == 3
        time.sleep(0.2)
        assert [r for r in gw.records(3) if r.served_by == MIRROR] == []
        assert gw.engines["challenger"].requests == []


def test_challenger_arm_requests_are_not_mirrored(tmp_path):
    with gateway_harness(tmp_path, ROLES, ab={"challenger_share": 1.0, "mirror_share": 1.0}) as gw:
        raw = gw.client().chat.completions.with_raw_response.create(
            model="stillhouse", messages=MSG, max_tokens=4
        )
        assert headers(raw)[0] == "challenger"
        time.sleep(0.2)
        assert [r for r in gw.records(1) if r.served_by == MIRROR] == []
        assert len(gw.engines["challenger"].requests) == 1


def test_a_slow_challenger_never_delays_the_user(tmp_path):
    shadow = {"mirror_concurrency": 1, "mirror_queue_size": 8}
    with gateway_harness(tmp_path, ROLES, ab=MIRRORED, shadow=shadow) as gw:
        gw.engines["challenger"].delay_s = 1.5
        client = gw.client()
        started = time.monotonic()
        for _ in range(3):
            client.chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
        with client.chat.completions.create(
            model="stillhouse", messages=MSG, max_tokens=4, stream=True
        ) as stream:
            list(stream)
        assert time.monotonic() - started < 1.0
        assert mirrors(gw, 1, timeout=5.0)  # and the mirror still lands, later


def test_a_failing_challenger_never_fails_the_user_nor_opens_its_circuit(tmp_path):
    with gateway_harness(tmp_path, ROLES, ab=MIRRORED) as gw:
        gw.engines["challenger"].mode = "error500"
        client = gw.client()
        for _ in range(5):  # more than breaker_failures (3)
            raw = client.chat.completions.with_raw_response.create(
                model="stillhouse", messages=MSG, max_tokens=4
            )
            assert raw.http_response.status_code == 200
            assert headers(raw) == ("champion", "champion", "none")
        got = mirrors(gw, 5)
        assert len(got) == 5
        assert all(m.status == 502 and m.fallback_reason == "upstream_5xx" for m in got)
        assert all(m.error and m.answer is None for m in got)
        assert gw.gateway.router.engines["challenger"].breaker.current_state() == "closed"
        registry = gw.gateway.metrics.registry
        failures = {"engine": "challenger"}
        assert not registry.get_sample_value("stillhouse_gateway_engine_failures_total", failures)
        assert mirror_count(gw, "error") == 5
        assert gw.engines["teacher"].requests == []


def test_an_open_challenger_circuit_drops_mirrors(tmp_path):
    with gateway_harness(tmp_path, ROLES, ab=MIRRORED) as gw:
        breaker = gw.gateway.router.engines["challenger"].breaker
        for _ in range(3):
            breaker.record_failure(breaker.allow())  # as user traffic on the challenger arm would
        gw.client().chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
        deadline = time.monotonic() + 5
        while mirror_count(gw, "dropped") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mirror_count(gw, "dropped") == 1
        assert gw.engines["challenger"].requests == []


def test_a_full_mirror_queue_drops_and_counts(tmp_path):
    shadow = {"mirror_concurrency": 1, "mirror_queue_size": 1}
    with gateway_harness(tmp_path, ROLES, ab=MIRRORED, shadow=shadow) as gw:
        gw.engines["challenger"].delay_s = 1.0
        client = gw.client()
        started = time.monotonic()
        for _ in range(6):
            client.chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
        assert time.monotonic() - started < 1.0
        assert mirror_count(gw, "dropped") >= 3  # one in flight, one waiting, the rest dropped
        text = httpx.get(gw.url + "/metrics", timeout=10).text
        assert 'stillhouse_mirror_requests_total{outcome="dropped"}' in text


def test_a_mirrored_answer_that_would_fall_back_is_recorded_without_a_teacher_call(tmp_path):
    with gateway_harness(tmp_path, ROLES, ab=MIRRORED) as gw:
        gw.engines["challenger"].logprob = -2.0
        raw = gw.client().chat.completions.with_raw_response.create(
            model="stillhouse", messages=MSG, max_tokens=6
        )
        assert headers(raw) == ("champion", "champion", "none")
        (m,) = mirrors(gw, 1)
        assert (m.served_by, m.status, m.fallback_reason) == (MIRROR, 200, "low_confidence")
        assert m.confidence == pytest.approx(-2.0) and m.answer.startswith("w11 ")
        assert gw.engines["teacher"].requests == []
        registry = gw.gateway.metrics.registry
        assert not registry.get_sample_value(
            "stillhouse_gateway_fallbacks_total", {"reason": "low_confidence"}
        )


def test_mirrored_answers_are_offered_to_the_shadow_scorer(tmp_path):
    with gateway_harness(tmp_path, ROLES, ab=MIRRORED, shadow={"fraction": 1.0}) as gw:
        gw.engines["challenger"].answer_ids = CHALLENGER_IDS
        raw = gw.client().chat.completions.with_raw_response.create(
            model="stillhouse", messages=MSG, max_tokens=5
        )
        mirror_id = raw.headers["x-request-id"] + ":mirror"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            by_id = {s.request_id: s for s in gw.shadow(2, timeout=0.2)}
            if mirror_id in by_id:
                break
        shadow = by_id[mirror_id]
        assert shadow.student_model == "ref-challenger"
        assert shadow.token_ids == (21, 22, 23, 24, 25)
        assert shadow.teacher_logprobs == pytest.approx((-0.5,) * 5)
        assert gw.engines["challenger"].requests[0]["return_token_ids"] is True


def test_admin_ab_sets_and_validates_the_mirror_share(tmp_path):
    with gateway_harness(tmp_path, ROLES, ab={"challenger_share": 0.0}) as gw:
        auth = {"authorization": f"Bearer {ADMIN_KEY}"}
        state = httpx.get(gw.url + "/admin/ab", headers=auth, timeout=10).json()
        assert state["mirror_share"] == 0.0
        for bad in (1.5, -0.1, "half", True, None):
            resp = gw.post("/admin/ab", {"mirror_share": bad, "challenger_share": 0.3},
                           key=ADMIN_KEY)  # fmt: skip
            assert resp.status_code == 400, bad
            error = resp.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["param"] == "mirror_share" and error["type"] == "invalid_request_error"
        assert gw.gateway.router.ab.share == 0.0  # nothing applied from a rejected call
        with TrafficLogReader(gw.settings.traffic_log_path) as reader:
            changes = len(reader.ab_changes())
        resp = gw.post("/admin/ab", {"mirror_share": 0.5, "actor": "test"}, key=ADMIN_KEY)
        assert resp.status_code == 200
        body = resp.json()
        assert body["mirror_share"] == 0.5 and body["previous"]["mirror_share"] == 0.0
        assert body["challenger_share"] == 0.0
        with TrafficLogReader(gw.settings.traffic_log_path) as reader:
            assert len(reader.ab_changes()) == changes  # not a split change
        text = httpx.get(gw.url + "/metrics", timeout=10).text
        assert "stillhouse_challenger_mirror_share 0.5" in text
        gw.post("/admin/ab", {"mirror_share": 1, "actor": "test"}, key=ADMIN_KEY)
        gw.client().chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
        assert len(mirrors(gw, 1)) == 1


def test_the_mirror_uses_the_challengers_own_threshold(tmp_path):
    with gateway_harness(tmp_path, ROLES, ab=MIRRORED) as gw:
        gw.engines["challenger"].logprob = -2.0  # below the configured -0.5
        challenger = gw.gateway.router.engines["challenger"]
        challenger.set_threshold(-3.0, "calibrated for this version")
        gw.client().chat.completions.create(model="stillhouse", messages=MSG, max_tokens=4)
        (m,) = mirrors(gw, 1)
        assert m.fallback_reason is None and m.confidence == pytest.approx(-2.0)
        assert gw.gateway.router.engines["challenger"].in_flight == 0
