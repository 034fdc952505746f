"""Parse and validate OpenAI request bodies (pure functions over bytes and dicts).

A request the gateway cannot serve as asked is the client's mistake and becomes an
`InvalidRequest` naming the offending parameter, before any engine sees it. What passes is
normalised into a `ParsedRequest`; `upstream_body` derives an engine's body from it (the
student's, in student.py, always asks for log-probabilities, which the gateway needs for its
confidence score and strips again if the client did not ask for them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from stillhouse.serving.gateway.errors import InvalidRequest, ModelNotFound

Endpoint = Literal["chat", "completions"]
UPSTREAM_PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}

MAX_TOP_LOGPROBS = 20
MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

# OpenAI's parameters plus vLLM's common sampling extras. Anything else is rejected, as OpenAI
# does, so a misspelt parameter is not silently ignored.
_OPENAI_COMMON = frozenset(
    {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "stop"}
)
_OPENAI_SAMPLING = frozenset(
    {"user", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
)
_VLLM_SAMPLING = frozenset({"top_k", "min_p", "repetition_penalty"})
_COMMON = _OPENAI_COMMON | _OPENAI_SAMPLING | _VLLM_SAMPLING
_CHAT_ONLY = frozenset(
    {"messages", "top_logprobs", "max_completion_tokens", "response_format", "metadata", "store"}
)
_COMPLETIONS_ONLY = frozenset({"prompt", "echo", "suffix", "best_of"})
ALLOWED = {"chat": _COMMON | _CHAT_ONLY, "completions": _COMMON | _COMPLETIONS_ONLY}


@dataclass(frozen=True)
class ParsedRequest:
    endpoint: Endpoint
    body: dict[str, Any]  # the client's body, validated
    stream: bool
    include_usage: bool
    # What the client asked for: chat `logprobs` + `top_logprobs`, completions `logprobs: k`.
    wants_logprobs: bool
    top_logprobs: int
    user: str | None

    def prompt_text(self) -> str:
        """What the traffic log stores as the prompt: messages as JSON, or the prompt string."""
        if self.endpoint == "chat":
            return json.dumps(self.body["messages"], ensure_ascii=False)
        return str(self.body["prompt"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value):
        raise InvalidRequest(f"'{name}' must be a number, got {value!r}", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}, got {value}", param=name)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise InvalidRequest(f"'{name}' must be an integer, got {value!r}", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return value


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean, got {value!r}", param=name)
    return value


def _message_text(content: Any, index: int) -> None:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return
    if isinstance(content, list) and content:
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise InvalidRequest("only text content parts are supported", param=param)
            if not isinstance(part.get("text"), str):
                raise InvalidRequest("a text content part needs a string 'text'", param=param)
        return
    raise InvalidRequest("message content must be a string or a list of text parts", param=param)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be a list of messages", param="messages")
    if not messages:
        raise InvalidRequest("'messages' must not be empty", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in MESSAGE_ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {sorted(MESSAGE_ROLES)}, got {role!r}",
                param=f"messages[{i}].role",
            )
        if message.get("content") is None and role != "assistant":
            raise InvalidRequest(
                f"messages[{i}].content is required", param=f"messages[{i}].content"
            )
        if message.get("content") is not None:
            _message_text(message["content"], i)


def _check_prompt(body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        body["prompt"] = prompt = prompt[0]
    if isinstance(prompt, list):
        raise InvalidRequest("batched prompts are not supported; send one prompt", param="prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("'prompt' must be a non-empty string", param="prompt")


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return
    raise InvalidRequest("'stop' must be a string or a list of at most 4 strings", param="stop")


MAX_DEPTH = 32  # nesting in a request body; orjson cannot write past 255, no request needs 32
MAX_METADATA_PAIRS = 16  # OpenAI's limits on `metadata`
RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})


def _check_depth(body: Any) -> None:
    """Refuse a body nested deeper than `MAX_DEPTH` (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"the request body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    ok = isinstance(metadata, dict) and len(metadata) <= MAX_METADATA_PAIRS
    ok = ok and all(
        len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()
    )
    if not ok:
        raise InvalidRequest(
            f"'metadata' must be an object of at most {MAX_METADATA_PAIRS} string values "
            "(keys up to 64 characters, values up to 512)",
            param="metadata",
        )


def _check_logit_bias(bias: Any) -> None:
    if bias is None:
        return
    ok = isinstance(bias, dict) and len(bias) <= 300
    ok = ok and all(
        k.isdigit() and len(k) <= 9 and _is_number(v) and -100 <= v <= 100 for k, v in bias.items()
    )
    if not ok:
        raise InvalidRequest(
            "'logit_bias' must map token ids (strings of digits) to numbers in [-100, 100]",
            param="logit_bias",
        )


def _check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if not isinstance(kind, str) or kind not in RESPONSE_FORMATS:
        raise InvalidRequest(
            "'response_format' must be an object whose 'type' is one of "
            f"{sorted(RESPONSE_FORMATS)}",
            param="response_format",
        )
    if kind == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
        raise InvalidRequest(
            "'response_format' of type json_schema needs a 'json_schema' object",
            param="response_format",
        )


def _string(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string", param=name)


def decode_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    _check_depth(body)
    return body


def parse_request(
    raw: bytes, endpoint: Endpoint, model_name: str, max_tokens_limit: int
) -> ParsedRequest:
    """Validate one request body; raises `InvalidRequest` or `ModelNotFound`."""
    body = decode_json(raw)
    unknown = sorted(set(body) - ALLOWED[endpoint])
    if unknown:
        raise InvalidRequest(f"unrecognized request argument: {unknown[0]}", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    if model != model_name:
        raise ModelNotFound(
            f"the model '{model}' does not exist; this gateway serves '{model_name}'",
            param="model",
            code="model_not_found",
        )
    if endpoint == "chat":
        _check_messages(body.get("messages"))
        if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
            _integer(body, "max_completion_tokens", 1, max_tokens_limit)
            body["max_tokens"] = body.pop("max_completion_tokens")
    else:
        _check_prompt(body)
        if _integer(body, "best_of", 1, 1) is None:
            body.pop("best_of", None)
    _integer(body, "max_tokens", 1, max_tokens_limit)
    _integer(body, "n", 1, 1)
    _integer(body, "seed", -(2**63), 2**63 - 1)
    _integer(body, "top_k", -1, 1_000_000)
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0)
    _number(body, "min_p", 0.0, 1.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    _number(body, "repetition_penalty", 0.0, 2.0)
    _check_stop(body.get("stop"))
    _check_metadata(body.get("metadata"))
    _check_logit_bias(body.get("logit_bias"))
    _check_response_format(body.get("response_format"))
    _boolean(body, "store")
    _boolean(body, "echo")
    _string(body, "suffix")
    if body.get("top_p") == 0:
        raise InvalidRequest("'top_p' must be greater than 0", param="top_p")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string", param="user")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and stream):
        raise InvalidRequest(
            "'stream_options' must be an object and needs 'stream': true", param="stream_options"
        )
    include_usage = bool(options) and _boolean(options, "include_usage")
    if endpoint == "chat":
        wants = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not wants:
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        top_n = top or 0
    else:
        if isinstance(body.get("logprobs"), bool):
            raise InvalidRequest("'logprobs' must be an integer for completions", param="logprobs")
        k = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        wants, top_n = k is not None, k or 0
    return ParsedRequest(endpoint, body, stream, include_usage, wants, top_n, user)


def upstream_body(
    request: ParsedRequest,
    served_name: str,
    *,
    logprobs_top: int | None,
    token_ids: bool = False,
) -> dict[str, Any]:
    """The body for an engine. `logprobs_top` asks for log-probabilities with at least that
    many alternatives (the student's confidence needs them); None forwards the client's own
    choice. `token_ids` asks vLLM for the prompt's and answer's token ids (shadow scoring)."""
    body = dict(request.body)
    body["model"] = served_name
    if logprobs_top is not None:
        top = max(logprobs_top, request.top_logprobs)
        if request.endpoint == "chat":
            body["logprobs"], body["top_logprobs"] = True, top
        else:
            body["logprobs"] = top
    if token_ids:
        body["return_token_ids"] = True
    if request.stream:
        # Usage in the final chunk gives the traffic log its token counts either way.
        body["stream_options"] = {"include_usage": True}
    return body
