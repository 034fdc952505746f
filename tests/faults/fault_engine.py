"""A fake engine speaking the OpenAI protocol over HTTP, in its own process, that can be told
to fail: the fault suite's stand-in for a vLLM server that misbehaves.

    python tests/faults/fault_engine.py --port 8101 --name champion
    curl -X POST localhost:8101/fault -d '{"mode": "stall_after_headers"}'
    curl localhost:8101/fault            # what it saw: requests, disconnects

Modes (`mode`, plus `delay_s` / `status` where they apply):
    ok                   answers (tests/unit/fake_vllm.py's answers, with log-probabilities)
    stall_after_headers  sends 200 and its headers, then nothing, forever
    stall_mid_stream     sends `after_events` events (or half a JSON body), then nothing
    error500             answers 500
    reset                closes the connection without an answer
    status               answers `status` with an OpenAI error body (a 4xx)
    slow                 waits `delay_s` before answering (a long, healthy generation)
    huge_event           streams one event of `event_bytes` (an echoed prompt's logprobs)
A request whose connection the gateway closes while it waits is recorded as a disconnect, with
the time, so a test can tell the gateway gave up on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from fake_vllm import Behaviour, engine_app

FAULT = web.AppKey("fault", dict)
STATS = web.AppKey("stats", dict)
FOREVER_S = 3600.0


def fault_app(name: str) -> web.Application:
    app = engine_app(Behaviour(), name)
    app[FAULT] = {"mode": "ok"}
    app[STATS] = {"requests": 0, "disconnects": [], "in_flight": 0}

    @web.middleware
    async def faults(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/fault" or request.method != "POST":
            return await handler(request)
        stats, fault = request.app[STATS], request.app[FAULT]
        stats["requests"] += 1
        stats["in_flight"] += 1
        try:
            return await _misbehave(request, handler, fault)
        except asyncio.CancelledError:
            stats["disconnects"].append(time.time())
            raise
        finally:
            stats["in_flight"] -= 1

    async def set_fault(request: web.Request) -> web.Response:
        if request.method == "POST":
            request.app[FAULT].clear()
            request.app[FAULT].update(await request.json())
            request.app[STATS].update(requests=0, disconnects=[])
        return web.json_response({**request.app[FAULT], **request.app[STATS]})

    app.middlewares.append(faults)
    app.router.add_route("*", "/fault", set_fault)
    return app


async def _misbehave(request: web.Request, handler: Any, fault: dict[str, Any]):
    mode = fault.get("mode", "ok")
    if mode == "ok":
        return await handler(request)
    if mode == "error500":
        return web.json_response({"error": {"message": "engine error"}}, status=500)
    if mode == "status":
        body = {"error": {"message": fault.get("message", "rejected"), "type": "BadRequestError"}}
        return web.json_response(body, status=int(fault.get("status", 400)))
    if mode == "reset":
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    if mode == "slow":
        await asyncio.sleep(float(fault.get("delay_s", 1.0)))
        return await handler(request)
    body = await request.json()
    stream = bool(body.get("stream"))
    if mode == "stall_after_headers":
        resp = web.StreamResponse(
            headers={"content-type": "text/event-stream" if stream else "application/json"}
        )
        await resp.prepare(request)
        await asyncio.sleep(FOREVER_S)
    if mode == "stall_mid_stream":
        return await _stall_mid_stream(request, handler, body, int(fault.get("after_events", 6)))
    if mode == "huge_event":
        return await _huge_event(request, int(fault.get("event_bytes", 1 << 20)))
    return web.json_response({"error": {"message": f"unknown mode {mode}"}}, status=500)


async def _stall_mid_stream(request: web.Request, handler: Any, body: dict, after: int):
    """The real answer's first `after` events (or the first half of its JSON), then silence."""
    resp = web.StreamResponse(
        headers={"content-type": "text/event-stream" if body.get("stream") else "application/json"}
    )
    await resp.prepare(request)
    answer = await handler(_Replay(request, body))
    raw = answer.body if isinstance(answer, web.Response) else b""
    if not body.get("stream"):
        await resp.write(bytes(raw)[: len(raw) // 2])
    else:
        for event in _Replay.events(answer)[:after]:
            await resp.write(event)
    await asyncio.sleep(FOREVER_S)
    return resp


async def _huge_event(request: web.Request, size: int) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "a" * size}, "logprobs": None,
                          "finish_reason": "stop"}]}  # fmt: skip
    await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


class _Replay:
    """The request, as the wrapped handler sees it, with streaming off: its JSON answer is cut
    into the events a stream would have sent (one per token)."""

    def __init__(self, request: web.Request, body: dict[str, Any]) -> None:
        self._request = request
        self._body = {**body, "stream": False}
        self.path = request.path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)

    async def json(self) -> dict[str, Any]:
        return self._body

    @staticmethod
    def events(answer: web.StreamResponse) -> list[bytes]:
        data = json.loads(answer.body) if isinstance(answer, web.Response) else {}
        choice = (data.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        tokens = (choice.get("logprobs") or {}).get("content") or []
        out = []
        for token in tokens:
            delta = {"role": "assistant", "content": token["token"]}
            event = {"id": "x", "object": "chat.completion.chunk", "created": 1,
                     "model": data.get("model"),
                     "choices": [{"index": 0, "delta": delta, "logprobs": {"content": [token]},
                                  "finish_reason": None}]}  # fmt: skip
            out.append(b"data: " + json.dumps(event).encode() + b"\n\n")
        if not out and message:
            event = {"choices": [{"index": 0, "delta": message, "finish_reason": None}]}
            out.append(b"data: " + json.dumps(event).encode() + b"\n\n")
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    # handler_cancellation: a request the gateway hangs up on is cancelled here, and recorded.
    web.run_app(
        fault_app(args.name),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
        shutdown_timeout=0.5,
    )


if __name__ == "__main__":
    main()
