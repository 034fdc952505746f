"""Shadow scoring: the teacher's log-probabilities of the student's own answer tokens.

For a share of student-served answers the gateway offers a `ShadowItem` (prompt and answer
token ids, the student's log-probabilities); a `WorkerPool` sends each to the teacher as one
`/v1/completions` call over prompt + answer with `prompt_logprobs` (one forward pass), and the
traffic log stores both sides, from which `eval` estimates KL(student ‖ teacher). Student and
teacher must share a tokenizer. `offer` never waits; a full queue drops the item and counts it
(`stillhouse_shadow_dropped_total`). More in docs/gateway.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stillhouse.common.config import ShadowSettings
from stillhouse.common.traffic import ShadowRecord
from stillhouse.serving.gateway.errors import ClientError
from stillhouse.serving.gateway.metrics import GatewayMetrics
from stillhouse.serving.gateway.traffic_log import TrafficLogWriter
from stillhouse.serving.gateway.upstream import Engine, UpstreamClient, UpstreamFailure
from stillhouse.serving.gateway.workers import WorkerPool

log = logging.getLogger("stillhouse.shadow")


@dataclass(frozen=True)
class ShadowItem:
    """One student answer waiting for the teacher's log-probabilities of its tokens."""

    request_id: str
    ts: float
    student_model: str | None
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    student_logprobs: tuple[float, ...]
    student_top: tuple[dict[int, float], ...] | None


def scoring_body(item: ShadowItem, served_name: str, top_k: int) -> dict[str, Any]:
    """One teacher forward pass over prompt + answer; `max_tokens=1` is vLLM's minimum."""
    return {
        "model": served_name,
        "prompt": [*item.prompt_token_ids, *item.token_ids],
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": top_k,
    }


def _logprob(entry: Any) -> float:
    value = entry["logprob"] if isinstance(entry, Mapping) else entry
    x = float(value)
    return -math.inf if math.isnan(x) else x


def teacher_logprobs(
    prompt_logprobs: Sequence[Mapping[str, Any] | None],
    n_prompt: int,
    token_ids: Sequence[int],
    top_k: int,
) -> tuple[tuple[float, ...], tuple[dict[int, float], ...]]:
    """From vLLM's `prompt_logprobs` over prompt + answer: the teacher's logprob of each
    answer token and its top-k {token id: logprob} there. Raises `ValueError` when the list
    does not line up with the tokens (a different tokenizer, a truncated prompt)."""
    if len(prompt_logprobs) != n_prompt + len(token_ids):
        raise ValueError(
            f"prompt_logprobs has {len(prompt_logprobs)} positions, "
            f"expected {n_prompt} prompt + {len(token_ids)} answer tokens"
        )
    chosen: list[float] = []
    tops: list[dict[int, float]] = []
    for position, token in zip(prompt_logprobs[n_prompt:], token_ids, strict=True):
        if not position:
            raise ValueError("a missing prompt_logprobs entry for an answer token")
        entries = {int(k): v for k, v in position.items()}
        if token not in entries:
            raise ValueError(f"token {token} is missing from the teacher's prompt_logprobs")
        chosen.append(_logprob(entries[token]))
        ranked = sorted(entries.items(), key=lambda kv: -_logprob(kv[1]))[:top_k]
        tops.append({tid: _logprob(v) for tid, v in ranked})
    return tuple(chosen), tuple(tops)


class ShadowScorer:
    """Scores queued student answers with the teacher, a few at a time, off the hot path."""

    def __init__(
        self,
        settings: ShadowSettings,
        teacher: Engine,
        client: UpstreamClient,
        writer: TrafficLogWriter,
        metrics: GatewayMetrics,
    ):
        self.settings = settings
        self.teacher = teacher
        self.client = client
        self.writer = writer
        self.metrics = metrics
        self.pool: WorkerPool[ShadowItem] = WorkerPool(
            "shadow",
            settings.queue_size,
            settings.concurrency,
            self._score_and_write,
            on_drop=metrics.shadow_dropped.inc,
            on_depth=metrics.shadow_queue_depth.set,
        )

    def offer(self, item: ShadowItem) -> bool:
        """Queue an answer without waiting; False (and counted) when the queue is full."""
        return self.pool.offer(item)

    def start(self) -> None:
        self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()

    async def _score_and_write(self, item: ShadowItem) -> None:
        try:
            record = await self.score(item)
        except (UpstreamFailure, ClientError, ValueError, KeyError, TypeError) as exc:
            self.metrics.shadow_errors.inc()
            log.warning("shadow scoring of %s failed: %s", item.request_id, exc)
        else:
            self.writer.submit(record)
            self.metrics.shadow_scored.inc()

    async def score(self, item: ShadowItem) -> ShadowRecord:
        body = scoring_body(item, self.teacher.served_name, self.settings.top_k)
        data = await self.client.post_json(
            self.teacher, "/completions", body, self.settings.timeout_s
        )
        prompt_logprobs = data["choices"][0]["prompt_logprobs"]
        chosen, tops = teacher_logprobs(
            prompt_logprobs, len(item.prompt_token_ids), item.token_ids, self.settings.top_k
        )
        n = min(len(item.token_ids), len(item.student_logprobs))
        return ShadowRecord(
            request_id=item.request_id,
            ts=item.ts,
            student_model=item.student_model,
            token_ids=item.token_ids[:n],
            student_logprobs=item.student_logprobs[:n],
            teacher_logprobs=chosen[:n],
            student_top=item.student_top[:n] if item.student_top is not None else None,
            teacher_top=tops[:n] if self.settings.top_k > 0 else None,
        )
