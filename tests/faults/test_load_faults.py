"""Load under failure, behind a real `stillhouse serve`: the teacher's concurrency budget when
every request falls back to it, and a client that hangs up on a long request."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
from clients import FAST_FALLBACK, ask, body
from serve_process import KEY

pytestmark = pytest.mark.slow

TEACHER_BUDGET = 4
TEACHER_S = 2.0  # how long the teacher takes per answer


def test_the_teacher_budget_refuses_the_excess_at_once(faulty_gateway):
    gp, engines = faulty_gateway(
        fallback={"teacher_max_concurrency": TEACHER_BUDGET, "attempt_timeout_s": 3 * TEACHER_S}
    )
    engines["champion"].fault("error500")
    for _ in range(FAST_FALLBACK["breaker_failures"]):
        ask(gp.url, stream=False)  # the student's breaker opens: everything goes to the teacher
    engines["teacher"].fault("slow", delay_s=TEACHER_S)
    n = 5 * TEACHER_BUDGET
    with ThreadPoolExecutor(n) as pool:
        seen = list(pool.map(lambda i: ask(gp.url, stream=i % 2 == 1), range(n)))
    admitted = [s for s in seen if s.status == 200]
    refused = [s for s in seen if s.status != 200]
    assert {s.status for s in refused} <= {503}
    assert TEACHER_BUDGET <= len(admitted) <= 2 * TEACHER_BUDGET
    for s in refused:
        assert s.headers["retry-after"] == "1"
        assert s.error is not None and s.error["code"] == "overloaded"
    # Refused without waiting for the teacher (relative bounds: this machine is shared), and
    # the admitted do not queue behind one another: about one teacher answer each.
    assert max(s.seconds for s in refused) < min(s.seconds for s in admitted)
    assert max(s.seconds for s in admitted) < 2 * TEACHER_S
    shed = gp.metric('stillhouse_gateway_shed_total{budget="teacher"}')
    slowest = max(s.seconds for s in admitted), max(s.seconds for s in refused)
    print(f"\nteacher budget: {len(admitted)} admitted (max {slowest[0]:.2f} s), "
          f"{len(refused)} refused (max {slowest[1]:.2f} s), shed {shed:g}")  # fmt: skip
    assert shed == len(refused)
    assert gp.metric('stillhouse_gateway_in_flight{budget="teacher"}') == 0


def test_a_client_that_hangs_up_stops_the_engine_request(faulty_gateway):
    gp, engines = faulty_gateway(fallback={"attempt_timeout_s": 30.0, "deadline_s": 60.0})
    champion = engines["champion"]
    champion.fault("slow", delay_s=30)
    payload = orjson.dumps(body(stream=False, max_tokens=8))
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    with socket.create_connection(("127.0.0.1", gp.port), timeout=5) as conn:
        conn.sendall(request)
        deadline = time.monotonic() + 5
        while champion.stats()["in_flight"] == 0:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.05)
        time.sleep(1.0)  # 1 s into a long non-streamed request
        hung_up = time.time()
    deadline = time.monotonic() + 5
    while not champion.stats()["disconnects"]:
        assert time.monotonic() < deadline, "the engine request ran on after the client left"
        time.sleep(0.05)
    (closed,) = champion.stats()["disconnects"]
    print(f"\nclient hang-up: the engine's connection closed {closed - hung_up:.2f} s later")
    assert closed - hung_up < 1.0
    assert engines["teacher"].stats()["requests"] == 0  # and no fallback was started for it
