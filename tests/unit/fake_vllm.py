"""An in-process stand-in for vLLM's OpenAI server, for fast gateway unit tests.

It speaks the parts of vLLM's protocol the gateway uses — chat and text completions, streamed
and not, `logprobs`/`top_logprobs`, `return_token_ids`, `return_tokens_as_token_ids`,
`prompt_logprobs` — and can be told to be unsure (a low log-probability per token), to fail
with a 5xx, to hang, or to drop the connection. The real-vLLM tests live in tests/integration.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Behaviour:
    answer_ids: list[int] = field(default_factory=lambda: [11, 12, 13, 14, 15, 16, 17, 18, 19, 1])
    logprob: float = -0.01
    mode: str = "ok"  # ok | error500 | hang | reject400 | break_stream
    requests: list[dict[str, Any]] = field(default_factory=list)
    delay_s: float = 0.0


def token_text(tid: int) -> str:
    return "<|end|>" if tid == 1 else f"w{tid} "


def prompt_ids_of(body: dict[str, Any]) -> list[int]:
    if isinstance(body.get("prompt"), list):
        return list(body["prompt"])
    text = json.dumps(body.get("messages") or body.get("prompt"))
    return [100 + (ord(c) % 50) for c in text[:20]]


def _name(tid: int, as_ids: bool) -> str:
    return f"token_id:{tid}" if as_ids else token_text(tid)


def _chat_logprobs(ids: list[int], lp: float, k: int, as_ids: bool) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": _name(t, as_ids),
                "logprob": lp,
                "bytes": list(token_text(t).encode()),
                "top_logprobs": [
                    {"token": _name(t + j, as_ids), "logprob": lp - j, "bytes": []}
                    for j in range(k)
                ],
            }
            for t in ids
        ]
    }


def _text_logprobs(ids: list[int], lp: float, k: int, as_ids: bool) -> dict[str, Any]:
    return {
        "tokens": [_name(t, as_ids) for t in ids],
        "token_logprobs": [lp for _ in ids],
        "top_logprobs": [{_name(t + j, as_ids): lp - j for j in range(k)} for t in ids],
        "text_offset": list(range(len(ids))),
    }


def _answer(b: Behaviour, body: dict[str, Any]) -> list[int]:
    n = body.get("max_tokens") or len(b.answer_ids)
    return b.answer_ids[:n]


def _choice(chat: bool, ids: list[int], body: dict[str, Any], b: Behaviour, final: bool) -> dict:
    text = "".join(token_text(t) for t in ids if t != 1)
    as_ids = bool(body.get("return_tokens_as_token_ids"))
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if final else None}
    if chat:
        choice["delta"] = {"role": "assistant", "content": text}
        want = body.get("logprobs")
        k = body.get("top_logprobs") or 0
        choice["logprobs"] = _chat_logprobs(ids, b.logprob, k, as_ids) if want else None
    else:
        choice["text"] = text
        k = body.get("logprobs")
        choice["logprobs"] = _text_logprobs(ids, b.logprob, k, as_ids) if k is not None else None
    if body.get("return_token_ids"):
        choice["token_ids"] = ids
    return choice


def _prompt_logprobs(prompt: list[int], k: int) -> list[Any]:
    out: list[Any] = [None]
    for tid in prompt[1:]:
        entry = {str(tid): {"logprob": -0.5, "rank": 1, "decoded_token": token_text(tid)}}
        for j in range(1, k + 1):
            entry[str(tid + 1000 + j)] = {"logprob": -1.0 - j, "rank": j + 1, "decoded_token": ""}
        out.append(entry)
    return out


def engine_app(b: Behaviour, served_name: str) -> web.Application:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": served_name}]})

    async def complete(request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        body = await request.json()
        b.requests.append(body)
        if b.delay_s:
            await asyncio.sleep(b.delay_s)
        if b.mode == "error500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if b.mode == "reject400":
            msg = "This model's maximum context length is 256 tokens"
            return web.json_response(
                {"error": {"message": msg, "type": "BadRequestError"}}, status=400
            )
        if b.mode == "hang":
            await asyncio.sleep(3600)
        if body.get("model") != served_name:
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        prompt = prompt_ids_of(body)
        ids = _answer(b, body)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                 "total_tokens": len(prompt) + len(ids)}  # fmt: skip
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice = _choice(chat, ids, body, b, final=True)
            if chat:
                choice["message"] = choice.pop("delta", None) or choice.get("message")
            data: dict[str, Any] = {"id": "cmpl-1", "object": obj, "created": 1,
                                    "model": served_name, "choices": [choice],
                                    "usage": usage}  # fmt: skip
            if body.get("return_token_ids"):
                data["prompt_token_ids"] = prompt
            if body.get("prompt_logprobs") is not None:
                data["choices"][0]["prompt_logprobs"] = _prompt_logprobs(
                    prompt, body["prompt_logprobs"]
                )
            return web.json_response(data)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i, tid in enumerate(ids):
            if b.mode == "break_stream" and i == len(ids) // 2 + 3:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            choice = _choice(chat, [tid], body, b, final=i == len(ids) - 1)
            chunk: dict[str, Any] = {"id": "cmpl-1", "object": obj + ".chunk", "created": 1,
                                     "model": served_name, "choices": [choice]}  # fmt: skip
            if i == 0 and body.get("return_token_ids"):
                chunk["prompt_token_ids"] = prompt
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            tail = {"id": "cmpl-1", "object": obj + ".chunk", "created": 1, "model": served_name,
                    "choices": [], "usage": usage}  # fmt: skip
            await resp.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/v1/completions", complete)
    return app


class LoopThread:
    """An asyncio loop on a thread, hosting aiohttp apps on loopback ports."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, app: web.Application) -> str:
        async def start() -> str:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            return f"http://127.0.0.1:{runner.addresses[0][1]}"

        return self.run(start())

    def stop_runner(self, index: int) -> None:
        self.run(self.runners[index].cleanup())

    def close(self) -> None:
        async def stop() -> None:
            for runner in reversed(self.runners):
                await runner.cleanup()

        try:
            self.run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@contextmanager
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()
