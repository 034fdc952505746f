"""Read and reshape engine answers (pure functions over the decoded JSON).

The student is asked for more than the client wanted (log-probabilities, token ids); before an
answer leaves the gateway, `shape_for_client` puts it back into exactly the OpenAI shape the
client asked for, naming the gateway's logical model. Both the full answers and the stream
chunks of both endpoints go through here, so the stream and non-stream paths cannot drift.
"""

from __future__ import annotations

import math
from typing import Any

from stillhouse.serving.gateway.confidence import TokenLogprobs
from stillhouse.serving.gateway.requests import ParsedRequest

TOKEN_ID_PREFIX = "token_id:"
_ENGINE_ONLY = ("prompt_token_ids", "token_ids", "prompt_logprobs", "kv_transfer_params")


def _first_choice(data: dict[str, Any]) -> dict[str, Any] | None:
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def _finite(value: Any) -> float:
    x = float(value)
    return x if not math.isnan(x) else -math.inf


def token_logprobs(data: dict[str, Any], endpoint: str) -> list[TokenLogprobs] | None:
    """The answer's per-token log-probabilities (chat and completions, full or one chunk);
    None when the engine sent none."""
    choice = _first_choice(data)
    if choice is None:
        return []
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return None
    if endpoint == "chat":
        content = logprobs.get("content") or []
        return [
            TokenLogprobs(
                _finite(item["logprob"]),
                tuple(_finite(t["logprob"]) for t in item.get("top_logprobs") or ()),
            )
            for item in content
        ]
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(values)
    return [
        TokenLogprobs(_finite(lp), tuple(_finite(x) for x in (top or {}).values()))
        for lp, top in zip(values, tops, strict=False)
        if lp is not None
    ]


def top_by_token_id(data: dict[str, Any], endpoint: str) -> list[dict[int, float]] | None:
    """Per token, the top-k {token id: logprob} when the engine was asked to name tokens by id
    (`return_tokens_as_token_ids`); None when the tokens are text."""
    choice = _first_choice(data)
    logprobs = choice.get("logprobs") if choice else None
    if not isinstance(logprobs, dict):
        return None
    if endpoint == "chat":
        rows = [
            [(t["token"], t["logprob"]) for t in item.get("top_logprobs") or ()]
            for item in logprobs.get("content") or []
        ]
    else:
        rows = [list((top or {}).items()) for top in logprobs.get("top_logprobs") or []]
    out: list[dict[int, float]] = []
    for row in rows:
        if not all(isinstance(tok, str) and tok.startswith(TOKEN_ID_PREFIX) for tok, _ in row):
            return None
        out.append({int(tok[len(TOKEN_ID_PREFIX) :]): _finite(lp) for tok, lp in row})
    return out


def answer_text(data: dict[str, Any], endpoint: str) -> str:
    """The answer text of a full response, or the text delta of one stream chunk."""
    choice = _first_choice(data)
    if choice is None:
        return ""
    if endpoint == "chat":
        message = choice.get("message") or choice.get("delta") or {}
        return message.get("content") or ""
    return choice.get("text") or ""


def finish_reason(data: dict[str, Any]) -> str | None:
    choice = _first_choice(data)
    return choice.get("finish_reason") if choice else None


def usage_counts(data: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None, None
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


def token_ids(data: dict[str, Any]) -> tuple[list[int] | None, list[int] | None]:
    """(prompt token ids, answer token ids) from an answer asked with `return_token_ids`."""
    choice = _first_choice(data) or {}
    prompt = data.get("prompt_token_ids") or choice.get("prompt_token_ids")
    return prompt, choice.get("token_ids")


def _trim_logprobs(choice: dict[str, Any], request: ParsedRequest) -> None:
    logprobs = choice.get("logprobs")
    if not request.wants_logprobs or not isinstance(logprobs, dict):
        choice["logprobs"] = None
        return
    k = request.top_logprobs
    if request.endpoint == "chat":
        for item in logprobs.get("content") or []:
            if item.get("top_logprobs"):
                item["top_logprobs"] = item["top_logprobs"][:k]
    elif logprobs.get("top_logprobs"):
        logprobs["top_logprobs"] = [
            dict(sorted(top.items(), key=lambda kv: -kv[1])[:k]) if top else top
            for top in logprobs["top_logprobs"]
        ]


def shape_for_client(
    data: dict[str, Any], request: ParsedRequest, model_name: str, *, added_logprobs: bool
) -> dict[str, Any]:
    """The answer as the client asked for it (mutates and returns `data`): the logical model
    name, no engine-only fields, and log-probabilities only as requested."""
    data["model"] = model_name
    for key in _ENGINE_ONLY:
        data.pop(key, None)
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        for key in _ENGINE_ONLY:
            choice.pop(key, None)
        if added_logprobs:
            _trim_logprobs(choice, request)
    return data
