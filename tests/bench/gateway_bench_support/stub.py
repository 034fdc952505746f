"""The stub upstream: nginx answering every completion with one fixed vLLM-style response.

The answers carry token log-probabilities (chat: `choices[0].logprobs.content`, completions:
`choices[0].logprobs.tokens/token_logprobs/top_logprobs/text_offset`) because the gateway asks
the student for them and scores its confidence from them. They are all high (-0.01 for the
chosen token), so the gateway never falls back to the teacher during the bench.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .procs import Server, free_port

HERE = Path(__file__).resolve().parent
MODEL = "stub"
CREATED = 1_760_000_000
# Tokens of the answer, as a demo-world student would write them. The first is the chosen one;
# each has five alternatives (the chosen one first) with low log-probabilities.
TOKENS = ["billing", "\n", "priority", ":", " high", "\n", "reply", ":", " sorry"]
CHOSEN_LOGPROB = -0.01
ALTERNATIVES = [" refund", " account", " shipping", " technical", " other"]
ALT_LOGPROBS = [-5.5, -6.0, -6.5, -7.0]
PROMPT_TOKENS = 12


def _top(token: str) -> list[tuple[str, float]]:
    others = [a for a in ALTERNATIVES if a != token][: len(ALT_LOGPROBS)]
    return [(token, CHOSEN_LOGPROB), *zip(others, ALT_LOGPROBS, strict=True)]


def _usage() -> dict[str, object]:
    n = len(TOKENS)
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "total_tokens": PROMPT_TOKENS + n,
        "completion_tokens": n,
        "prompt_tokens_details": None,
    }


def chat_body() -> dict[str, object]:
    content = [
        {
            "token": tok,
            "logprob": CHOSEN_LOGPROB,
            "bytes": list(tok.encode()),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in _top(tok)
            ],
        }
        for tok in TOKENS
    ]
    message = {
        "role": "assistant",
        "content": "".join(TOKENS),
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": [],
        "reasoning_content": None,
    }
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": {"content": content},
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": _usage(),
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def completion_body() -> dict[str, object]:
    offsets, at = [], 0
    for tok in TOKENS:
        offsets.append(at)
        at += len(tok)
    logprobs = {
        "text_offset": offsets,
        "token_logprobs": [CHOSEN_LOGPROB] * len(TOKENS),
        "tokens": TOKENS,
        "top_logprobs": [dict(_top(tok)) for tok in TOKENS],
    }
    return {
        "id": "cmpl-stub",
        "object": "text_completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "text": "".join(TOKENS),
                "logprobs": logprobs,
                "finish_reason": "stop",
                "stop_reason": None,
                "prompt_logprobs": None,
            }
        ],
        "usage": _usage(),
        "kv_transfer_params": None,
    }


def models_body() -> dict[str, object]:
    # vLLM answers to its served model name only; the gateway's engines are named by role.
    names = [MODEL, "teacher", "champion", "challenger"]
    return {
        "object": "list",
        "data": [
            {
                "id": n,
                "object": "model",
                "created": CREATED,
                "owned_by": "vllm",
                "root": n,
                "parent": None,
                "max_model_len": 2048,
                "permission": [],
            }
            for n in names
        ],
    }


def _nginx_quote(text: str) -> str:
    # Inside single quotes nginx unescapes \\ and \' (and expands $variables: none allowed).
    assert "$" not in text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _nginx_return(name: str, body: dict[str, object]) -> str:
    """`set` + `return` directives sending `body`. nginx caps one config token at 4 KiB, so the
    JSON goes into several variables, concatenated per request (a few microseconds)."""
    text = json.dumps(body, separators=(",", ":"))
    chunks = [text[i : i + 1800] for i in range(0, len(text), 1800)]  # <= 3600 once escaped
    lines = [f"set ${name}_{i} {_nginx_quote(c)};" for i, c in enumerate(chunks)]
    lines.append("return 200 '" + "".join(f"${name}_{i}" for i in range(len(chunks))) + "';")
    return "\n            ".join(lines)


def find_nginx() -> str | None:
    # Debian puts it in /usr/sbin, which a non-root PATH may lack.
    return shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def nginx_server(prefix: Path, nginx: str) -> tuple[Server, str]:
    """An nginx stub on a free loopback port, and its OpenAI base URL (ending in /v1)."""
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = (HERE / "nginx.conf.in").read_text()
    for name, value in {
        "@PREFIX@": str(prefix),
        "@PORT@": str(port),
        "@CHAT@": _nginx_return("chat", chat_body()),
        "@COMPLETION@": _nginx_return("completion", completion_body()),
        "@MODELS@": _nginx_return("models", models_body()),
    }.items():
        conf = conf.replace(name, value)
    (prefix / "nginx.conf").write_text(conf)
    argv = [
        nginx,
        "-p",
        str(prefix),
        "-c",
        str(prefix / "nginx.conf"),
        "-e",
        str(prefix / "error.log"),
    ]
    return Server("nginx stub", argv, prefix / "stdout.log"), f"http://127.0.0.1:{port}/v1"
