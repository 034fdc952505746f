"""A stand-in for a hosted OpenAI-compatible judge: `/v1/chat/completions` over HTTP on loopback.

Only for what a real vLLM judge cannot show here cheaply (a refused key, a hang, a 5xx, a
malformed reply on demand, the peak of concurrent requests); the real-vLLM judge test lives in
tests/integration/test_judge_vllm.py. Replies are chosen by a `responder(body, index)` callable;
`demo_responder` reads the demo judge formats and prefers the answer that contains "GOOD".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from fake_vllm import LoopThread

from stillhouse.common.prompts import JUDGE_INSTRUCTION, PAIRWISE_INSTRUCTION

PROMPT_TOKENS = 11
COMPLETION_TOKENS = 7


@dataclass(frozen=True)
class Reply:
    content: str | None = None
    status: int = 200
    hang: bool = False


Responder = Callable[[dict[str, Any], int], Reply]


def user_text(body: dict[str, Any]) -> str:
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")


def shown_answers(body: dict[str, Any]) -> tuple[str, str]:
    """The two answers of a demo pairwise prompt, in the order shown."""
    text = user_text(body)
    rest = text.split("\nanswer a:\n", 1)[1]
    a, b = rest.split("\nanswer b:\n", 1)
    return a, b


def demo_responder(body: dict[str, Any], index: int) -> Reply:
    """Score 4 for a single answer (5 if it says GOOD); in pairwise, the GOOD answer wins; any
    other prompt (another template) gets a plain score of 3."""
    text = user_text(body)
    if text.startswith(PAIRWISE_INSTRUCTION):
        a, b = shown_answers(body)
        winner = "a" if "GOOD" in a and "GOOD" not in b else "b" if "GOOD" in b else "tie"
        return Reply(json.dumps({"winner": winner, "reason": "the good one"}))
    if text.startswith(JUDGE_INSTRUCTION):
        score = 5 if "GOOD" in text else 4
        return Reply(json.dumps({"score": score, "reason": "fine"}))
    return Reply(json.dumps({"score": 3, "reason": "generic"}))


def position_biased(body: dict[str, Any], index: int) -> Reply:
    """Always prefers whatever is shown first: inconsistent under the order swap."""
    return Reply(json.dumps({"winner": "a", "reason": "first is best"}))


@dataclass
class FakeJudge:
    responder: Responder = demo_responder
    api_key: str | None = None  # when set, other keys get OpenAI's 401
    model: str | None = None  # when set, other models get vLLM's 404
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    refused: int = 0  # 401s sent

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.Response:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if self.api_key is not None and given != self.api_key:
                self.refused += 1
                msg = f"Incorrect API key provided: {given}. You can find your API key at ..."
                err = {"message": msg, "type": "invalid_request_error", "code": "invalid_api_key"}
                return web.json_response({"error": err}, status=401)
            body = await request.json()
            if self.model is not None and body.get("model") != self.model:
                msg = f"The model `{body.get('model')}` does not exist."
                err = {"message": msg, "type": "NotFoundError", "code": 404}
                return web.json_response({"error": err}, status=404)
            index = len(self.requests)
            self.requests.append(body)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                reply = self.responder(body, index)
                if reply.hang:
                    await asyncio.sleep(3600)
            finally:
                self.in_flight -= 1
            if reply.status != 200:
                err = {"message": f"upstream said {reply.status}", "type": "InternalServerError"}
                return web.json_response({"error": err}, status=reply.status)
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                     "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}  # fmt: skip
            message = {"role": "assistant", "content": reply.content}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            return web.json_response({
                "id": f"chatcmpl-{index}", "object": "chat.completion", "created": 1,
                "model": body.get("model"), "choices": [choice], "usage": usage,
            })  # fmt: skip

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


def serve(loop: LoopThread, fake: FakeJudge) -> str:
    """Start `fake` on a free loopback port of `loop` (stopped with the loop); the OpenAI base
    URL (…/v1). A handler is cancelled when its client hangs up (a timed-out call), so no
    hanging request outlives the test."""

    async def start() -> str:
        runner = web.AppRunner(
            fake.app(), access_log=None, shutdown_timeout=1.0, handler_cancellation=True
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        loop.runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    return loop.run(start())
