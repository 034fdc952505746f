"""What a client sees: one request to a real gateway, streamed or not, reduced to plain data
(status, who served it, the text, whether a stream ended cleanly or with an error event)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx
from serve_process import KEY

MSG = [{"role": "user", "content": "my order arrived broken"}]

# Small limits, so each fault shows within seconds; the cases scale with these.
FAST_FALLBACK = {
    "attempt_timeout_s": 1.0,
    "stream_idle_timeout_s": 1.0,
    "deadline_s": 6.0,
    "retries": 1,
    "retry_backoff_s": 0.01,
    "breaker_failures": 3,
    "breaker_cooldown_s": 1.0,
}


@dataclass
class Seen:
    status: int
    seconds: float
    served_by: str | None = None
    fallback: str | None = None
    text: str = ""
    done: bool = False  # a stream that ended with [DONE]
    error: dict | None = None  # the OpenAI error object (JSON body or a stream's error event)
    headers: dict[str, str] = field(default_factory=dict)


def body(stream: bool, max_tokens: int = 8) -> dict:
    return {"model": "stillhouse", "messages": MSG, "max_tokens": max_tokens, "stream": stream}


def ask(url: str, stream: bool, *, max_tokens: int = 8, timeout: float = 30.0) -> Seen:
    """One chat request; the stream is read to its end (or its error event)."""
    started = time.monotonic()
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        json=body(stream, max_tokens),
        headers=headers,
        timeout=timeout,
    ) as resp:
        seen = Seen(
            resp.status_code,
            0.0,
            resp.headers.get("x-stillhouse-served-by"),
            resp.headers.get("x-stillhouse-fallback"),
            headers=dict(resp.headers),
        )
        if not stream or resp.status_code != 200:
            data = json.loads(resp.read())
            if resp.status_code == 200:
                seen.text = data["choices"][0]["message"]["content"]
            else:
                seen.error = data.get("error")
        else:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    seen.done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    seen.error = event["error"]
                    continue
                for choice in event.get("choices", []):
                    seen.text += choice["delta"].get("content") or ""
    seen.seconds = time.monotonic() - started
    return seen
