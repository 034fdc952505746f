"""What one request did, filled in as it goes: the `Trace` every part of the gateway writes to.

    trace = recorder.new_trace(request_id, user_key, router.assign(user_key))
    ... the transports fill it in (who served, why it fell back, tokens, timings) ...
    recorder.finish(request, trace, endpoint)     # its traffic record and metrics

`route_headers` are the `x-stillhouse-*` headers every answer carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stillhouse.common.roles import Role
from stillhouse.serving.gateway.assignment import Arm

NOT_SERVED = "none"  # `served_by` while (or when) no engine answered


@dataclass(slots=True)
class Trace:
    """One request's progress; becomes its traffic record and metrics."""

    request_id: str
    arrived: float  # wall clock
    started: float  # monotonic
    arm: Arm
    user_hash: str
    served_by: Role | str = NOT_SERVED  # a role, NOT_SERVED, or common.traffic.MIRROR
    fallback_reason: str | None = None
    confidence: float | None = None
    upstream_s: float = 0.0
    ttft_s: float | None = None
    status: int = 200
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    answer: str = ""
    student_answer: str | None = None
    student_completion_tokens: int | None = None
    student_model: str | None = None


@dataclass(slots=True)
class Reply:
    """A non-streamed answer, ready to send."""

    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def route_headers(trace: Trace) -> dict[str, str]:
    return {
        "x-request-id": trace.request_id,
        "x-stillhouse-arm": trace.arm,
        "x-stillhouse-served-by": trace.served_by,
        "x-stillhouse-fallback": trace.fallback_reason or "none",
    }
