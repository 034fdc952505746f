"""Generated bad input against a real `stillhouse serve` (fault engines behind it): wrong types
at every level, deep nesting, huge strings, non-UTF-8 bytes in the body and in every header.
Not one answer with status >= 500, every 4xx in OpenAI's error shape, no traceback logged."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_process import KEY

pytestmark = pytest.mark.slow

JSON_REQUESTS = 2000
RAW_REQUESTS = 400
BASE = {
    "chat": {"model": "stillhouse", "messages": [{"role": "user", "content": "hi"}],
             "max_tokens": 4},
    "completions": {"model": "stillhouse", "prompt": "hi", "max_tokens": 4},
}  # fmt: skip
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
KNOWN_KEYS = sorted(
    {"model", "messages", "prompt", "stream", "stream_options", "max_tokens", "temperature",
     "top_p", "n", "stop", "user", "seed", "presence_penalty", "frequency_penalty",
     "logit_bias", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
     "metadata", "store", "echo", "suffix", "best_of", "top_k", "min_p", "repetition_penalty"}
)  # fmt: skip
HEADERS = ["authorization", "x-stillhouse-user", "x-request-id", "content-type", "user-agent",
           "accept", "x-custom"]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)


def containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


json_values = st.recursive(scalars, containers, max_leaves=12)


def nested(depth: int, leaf: Any, as_list: bool) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value] if as_list else {"a": value}
    return value


deep_values = st.builds(nested, st.integers(1, 400), scalars, st.booleans())
huge_strings = st.integers(10_000, 1_500_000).map(lambda n: "x" * n)
any_value = st.one_of(json_values, json_values, deep_values, huge_strings)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """(endpoint, body bytes): a valid request with a few parts replaced, or raw bytes."""
    endpoint = draw(st.sampled_from(["chat", "completions"]))
    if draw(st.integers(0, 9)) == 0:  # not even JSON (or not UTF-8)
        return endpoint, draw(st.binary(max_size=200))
    body: dict[str, Any] = orjson.loads(orjson.dumps(BASE[endpoint]))
    body["stream"] = draw(st.booleans())
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "top", "message", "message_part", "options"]))
        value = draw(any_value)
        if where == "top":
            body[draw(st.sampled_from([*KNOWN_KEYS, "unknown"]))] = value
        elif where == "message" and endpoint == "chat":
            field = draw(st.sampled_from(["role", "content", "name", "tool_calls"]))
            body["messages"] = [{"role": "user", "content": "hi", field: value}]
        elif where == "message_part" and endpoint == "chat":
            body["messages"] = [{"role": "user", "content": [{"type": "text", "text": value}]}]
        else:
            body["stream"], body["stream_options"] = True, {"include_usage": value}
    try:
        return endpoint, orjson.dumps(body)
    except orjson.JSONEncodeError:  # nested past what orjson writes: send it as text
        return endpoint, repr(body).encode()


def assert_openai_error(resp: httpx.Response) -> None:
    error = resp.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert set(error) == {"message", "type", "param", "code"}


def test_generated_requests_never_get_a_5xx(faulty_gateway):
    gp, _ = faulty_gateway()
    statuses: dict[int, int] = {}
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=gp.url, headers=headers, timeout=30) as http:

        @settings(
            max_examples=JSON_REQUESTS,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(requests())
        def one(request: tuple[str, bytes]) -> None:
            endpoint, raw = request
            resp = http.post(PATHS[endpoint], content=raw)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, (resp.status_code, resp.text[:300], raw[:300])
            if resp.status_code != 200:
                assert_openai_error(resp)

        one()
    print(f"\nfuzz (JSON): {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= JSON_REQUESTS
    assert statuses.get(200, 0) > 0 and sum(n for s, n in statuses.items() if s >= 400) > 0
    assert "Traceback" not in gp.output()


header_bytes = st.binary(min_size=1, max_size=40).filter(
    lambda b: b"\r" not in b and b"\n" not in b and b"\x00" not in b
)


def raw_request(port: int, head: list[bytes], body: bytes) -> int:
    """One HTTP/1.1 request over a raw socket; the response's status."""
    request = b"\r\n".join(
        [b"POST /v1/chat/completions HTTP/1.1", b"host: gw", b"connection: close",
         b"content-length: " + str(len(body)).encode(), *head, b"", b""]
    ) + body  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    status = int(status_line.split()[1])
    if status >= 400 and b"application/json" in rest.split(b"\r\n\r\n")[0]:
        error = orjson.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
        assert {"message", "type", "param", "code"} == set(error)
    return status


def test_non_utf8_bytes_in_headers_and_body_never_get_a_5xx(faulty_gateway):
    gp, _ = faulty_gateway()
    statuses: dict[int, int] = {}
    good_body = orjson.dumps(BASE["chat"])

    @settings(
        max_examples=RAW_REQUESTS,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.sampled_from(HEADERS),
        header_bytes,
        st.booleans(),
        st.binary(max_size=64),
    )
    def one(name: str, value: bytes, bad_body: bool, junk: bytes) -> None:
        head = [b"authorization: Bearer " + KEY.encode(), b"content-type: application/json"]
        head = [h for h in head if not h.startswith(name.encode() + b":")]
        prefix = b"Bearer " if name == "authorization" and value[:1] != b"B" else b""
        head.append(name.encode() + b": " + prefix + value)
        body = good_body[:-1] + b', "user": "' + junk + b'"}' if bad_body else good_body
        status = raw_request(gp.port, head, body)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (status, name, value, body[-80:])

    one()
    print(f"\nfuzz (raw socket): {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= RAW_REQUESTS
    output = gp.output()
    assert "Traceback" not in output
    # aiohttp refuses control bytes in a header itself: one counted line, not one per request
    assert output.count("malformed HTTP request") <= 1
