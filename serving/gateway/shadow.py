"""Shadow scoring: the teacher's log-probabilities of the student's own answer tokens.

For a share of student-served requests the gateway queues a job (prompt token ids, answer
token ids, the student's log-probabilities). A few workers send each to the teacher as one
`/v1/completions` call over prompt + answer with `prompt_logprobs`, so one forward pass gives
log p_teacher(token_t | prefix) for every answer token, and store both sides in the traffic
log, where `eval` estimates KL(student ‖ teacher) from them. Student and teacher must share a
tokenizer (as logit distillation requires anyway).

Off the hot path by construction: `offer` never waits; when the queue is full the job is
dropped and counted (`stillhouse_shadow_dropped_total`).
"""

from __future__ import annotations

import asyncio
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

log = logging.getLogger("stillhouse.shadow")


@dataclass(frozen=True)
class ShadowJob:
    request_id: str
    ts: float
    student_model: str | None
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    student_logprobs: tuple[float, ...]
    student_top: tuple[dict[int, float], ...] | None


def scoring_body(job: ShadowJob, served_name: str, top_k: int) -> dict[str, Any]:
    """One teacher forward pass over prompt + answer; `max_tokens=1` is vLLM's minimum."""
    return {
        "model": served_name,
        "prompt": [*job.prompt_token_ids, *job.token_ids],
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
        self.queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=settings.queue_size)
        self.workers: list[asyncio.Task[None]] = []

    def offer(self, job: ShadowJob) -> bool:
        """Queue a job without waiting; False (and counted) when the queue is full."""
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.shadow_dropped.inc()
            return False
        self.metrics.shadow_queue_depth.set(self.queue.qsize())
        return True

    def start(self) -> None:
        self.workers = [
            asyncio.create_task(self._work(), name=f"shadow-{i}")
            for i in range(self.settings.concurrency)
        ]

    async def stop(self) -> None:
        for task in self.workers:
            task.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)
        self.workers = []

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            self.metrics.shadow_queue_depth.set(self.queue.qsize())
            try:
                record = await self.score(job)
            except (UpstreamFailure, ClientError, ValueError, KeyError, TypeError) as exc:
                self.metrics.shadow_errors.inc()
                log.warning("shadow scoring of %s failed: %s", job.request_id, exc)
            else:
                self.writer.submit(record)
                self.metrics.shadow_scored.inc()
            finally:
                self.queue.task_done()

    async def score(self, job: ShadowJob) -> ShadowRecord:
        body = scoring_body(job, self.teacher.served_name, self.settings.top_k)
        data = await self.client.post_json(
            self.teacher, "/completions", body, self.settings.timeout_s
        )
        prompt_logprobs = data["choices"][0]["prompt_logprobs"]
        chosen, tops = teacher_logprobs(
            prompt_logprobs, len(job.prompt_token_ids), job.token_ids, self.settings.top_k
        )
        n = min(len(job.token_ids), len(job.student_logprobs))
        return ShadowRecord(
            request_id=job.request_id,
            ts=job.ts,
            student_model=job.student_model,
            token_ids=job.token_ids[:n],
            student_logprobs=job.student_logprobs[:n],
            teacher_logprobs=chosen[:n],
            student_top=job.student_top[:n] if job.student_top is not None else None,
            teacher_top=tops[:n] if self.settings.top_k > 0 else None,
        )
