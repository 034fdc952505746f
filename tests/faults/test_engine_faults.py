"""A student engine that fails in each way an engine fails, streamed and not, behind a real
`stillhouse serve`: every client gets an answer within the deadline or a clean error (a stream
ends with an error event, never hangs), the breaker opens after `breaker_failures` in both
modes, and /metrics counts it. Then the half-open probe, judged on its whole attempt."""

from __future__ import annotations

import math
import threading
import time

import pytest
from clients import FAST_FALLBACK, Seen, ask

pytestmark = pytest.mark.slow

K = FAST_FALLBACK["breaker_failures"]
COOLDOWN_S = FAST_FALLBACK["breaker_cooldown_s"]
DEADLINE_S = FAST_FALLBACK["deadline_s"]
FAULTS = ["stall_after_headers", "stall_mid_stream", "error500", "reset"]
REASON = {
    "stall_after_headers": "timeout",
    "stall_mid_stream": "timeout",
    "error500": "upstream_5xx",
    "reset": "connection",
}


def circuit(gp, role: str = "champion") -> float:
    return gp.metric(f'stillhouse_gateway_circuit_state{{engine="{role}"}}')


def close_breaker(gp, champion) -> None:
    """Heal the champion and let a probe close its breaker."""
    champion.fault("ok")
    deadline = time.monotonic() + 10
    while circuit(gp) != 0:
        assert time.monotonic() < deadline, "the breaker did not close after the engine healed"
        time.sleep(COOLDOWN_S / 4)
        ask(gp.url, stream=False)


def broken_off(seen: Seen) -> bool:
    """A stream that started with the student's answer and ended with an error event."""
    return seen.status == 200 and not seen.done and seen.error is not None


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failing_student_opens_its_breaker_and_every_client_is_answered(faulty_gateway, fault):
    gp, engines = faulty_gateway()
    champion = engines["champion"]
    for stream in (False, True):
        failures_before = gp.metric(
            'stillhouse_gateway_engine_failures_total{engine="champion"}', 0
        )
        champion.fault(fault, after_events=6)
        seen = [ask(gp.url, stream) for _ in range(K + 3)]
        # A refused or reset connection is retried once on the same engine; nothing else is.
        tries = 1 + FAST_FALLBACK["retries"] if fault == "reset" else 1
        failing = math.ceil(K / tries)  # the requests that reach the student before it opens
        assert all(s.status == 200 for s in seen), [(s.status, s.error) for s in seen]
        assert max(s.seconds for s in seen) < DEADLINE_S
        if fault == "stall_mid_stream" and stream:
            # Past the hold window the student's tokens were on their way: no fallback is
            # possible without showing two answers, so the stream ends with an error event.
            assert all(broken_off(s) for s in seen[:failing]), seen[:failing]
            assert all(s.text for s in seen[:failing])
        else:
            assert [s.fallback for s in seen[:failing]] == [REASON[fault]] * failing
            assert all(s.served_by == "teacher" and (s.done or not stream) for s in seen)
        # open: the rest never reached the student
        assert [s.fallback for s in seen[failing:]] == ["circuit_open"] * (len(seen) - failing)
        assert champion.stats()["requests"] == K
        assert circuit(gp) == 2
        failures = gp.metric('stillhouse_gateway_engine_failures_total{engine="champion"}', 0)
        print(f"\n{fault} stream={stream}: statuses {sorted({s.status for s in seen})}, "
              f"max {max(s.seconds for s in seen):.2f} s, engine failures "
              f"{failures - failures_before:g}, circuit {circuit(gp):g}")  # fmt: skip
        assert failures - failures_before == K
        close_breaker(gp, champion)
    assert "Traceback" not in gp.output()


def test_a_probe_is_judged_on_its_whole_stream(faulty_gateway):
    gp, engines = faulty_gateway()
    champion = engines["champion"]
    champion.fault("stall_after_headers")
    for _ in range(K):
        assert ask(gp.url, stream=True).served_by == "teacher"
    assert circuit(gp) == 2
    time.sleep(COOLDOWN_S + 0.1)
    # The probe's headers arrive at once; it is a failure only once its tokens do not.
    probe = ask(gp.url, stream=True)
    assert (probe.served_by, probe.fallback) == ("teacher", "timeout")
    assert champion.stats()["requests"] == K + 1
    assert circuit(gp) == 2  # the probe failed: open again, not closed by its headers
    champion.fault("ok")
    time.sleep(COOLDOWN_S + 0.1)
    healed = ask(gp.url, stream=True)
    assert (healed.served_by, healed.done) == ("champion", True)
    assert circuit(gp) == 0


def test_a_stale_success_does_not_close_an_open_breaker(faulty_gateway):
    # A cool-down longer than the test: "open" cannot turn half-open while it runs.
    gp, engines = faulty_gateway(
        fallback={"attempt_timeout_s": 4.0, "deadline_s": 10.0, "breaker_cooldown_s": 60.0}
    )
    champion = engines["champion"]
    champion.fault("slow", delay_s=2.5)
    slow: list[Seen] = []
    thread = threading.Thread(target=lambda: slow.append(ask(gp.url, stream=False)))
    thread.start()
    time.sleep(0.5)  # it is waiting on the champion now
    champion.fault("error500")
    for _ in range(K):
        assert ask(gp.url, stream=False).fallback == "upstream_5xx"
    assert circuit(gp) == 2
    thread.join(10)
    assert slow[0].served_by == "champion"  # it succeeded, after the breaker had opened
    assert circuit(gp) == 2
    assert ask(gp.url, stream=False).fallback == "circuit_open"


def test_an_sse_line_of_megabytes_passes_through(faulty_gateway):
    # 20 log-probabilities per token of an echoed long prompt make one event of megabytes.
    gp, engines = faulty_gateway()
    engines["champion"].fault("error500")
    engines["teacher"].fault("huge_event", event_bytes=3 << 20)
    seen = ask(gp.url, stream=True)
    assert (seen.status, seen.served_by, seen.done) == (200, "teacher", True)
    assert len(seen.text) == 3 << 20
