"""The challenger's mirror phase: it answers copies of champion-arm requests that no user sees.

    mirror.offer(request, trace)     after a user's answer is decided: with probability
                                     `ab.mirror`, a `MirrorItem` into a bounded `WorkerPool`
    worker: the same request, non-streamed, to the challenger (the shared student step) →
            its policy's decision → a traffic record "<id>:mirror" (arm challenger, served_by
            mirror) → maybe the shadow scorer

It can neither change, delay nor fail a user's answer, never falls back, and never gives the
challenger's circuit breaker a verdict (docs/gateway.md says why, and what is counted).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stillhouse.common.config import GatewaySettings
from stillhouse.common.roles import Role
from stillhouse.common.traffic import MIRROR, MIRROR_SUFFIX
from stillhouse.serving.gateway import responses
from stillhouse.serving.gateway.errors import ClientError, error_body
from stillhouse.serving.gateway.metrics import GatewayMetrics
from stillhouse.serving.gateway.recorder import Recorder
from stillhouse.serving.gateway.requests import UPSTREAM_PATHS, ParsedRequest
from stillhouse.serving.gateway.router import Router
from stillhouse.serving.gateway.student import StudentCall, StudentStep
from stillhouse.serving.gateway.trace import Trace
from stillhouse.serving.gateway.upstream import UpstreamClient, UpstreamFailure
from stillhouse.serving.gateway.workers import WorkerPool

log = logging.getLogger("stillhouse.mirror")


@dataclass(frozen=True, slots=True)
class MirrorItem:
    """A champion-arm request waiting to be asked of the challenger."""

    request: ParsedRequest  # the client's request, as parsed
    request_id: str  # the original request's id
    user_hash: str  # the original request's user


def unstreamed(request: ParsedRequest) -> ParsedRequest:
    """The same request asked for in one piece (a mirror call is never streamed)."""
    body = {k: v for k, v in request.body.items() if k not in ("stream", "stream_options")}
    return dataclasses.replace(request, body=body, stream=False, include_usage=False)


class Mirror:
    """Mirrors a share of champion-arm requests to the challenger; owned by the app."""

    def __init__(
        self,
        settings: GatewaySettings,
        router: Router,
        student: StudentStep,
        client: UpstreamClient,
        recorder: Recorder,
        metrics: GatewayMetrics,
        rng: random.Random,
        clock: Callable[[], float],
    ) -> None:
        self.router = router
        self.student = student
        self.client = client
        self.recorder = recorder
        self.metrics = metrics
        self.rng = rng
        self.clock = clock
        self.timeout_s = settings.fallback.attempt_timeout_s  # one call, no retries
        self.pool: WorkerPool[MirrorItem] = WorkerPool(
            MIRROR,
            settings.shadow.mirror_queue_size,
            settings.shadow.mirror_concurrency,
            self._handle,
            on_drop=metrics.mirror_requests.labels("dropped").inc,
        )

    def offer(self, request: ParsedRequest | None, trace: Trace) -> bool:
        """After a request is answered: maybe queue its mirror. Never waits."""
        share = self.router.ab.mirror
        if (
            share <= 0
            or request is None
            or trace.arm != Role.CHAMPION
            or trace.status != 200
            or not self.router.has_challenger
            or self.rng.random() >= share
        ):
            return False
        return self.pool.offer(MirrorItem(request, trace.request_id, trace.user_hash))

    def start(self) -> None:
        self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()

    async def _handle(self, item: MirrorItem) -> None:
        try:
            outcome = await self.run(item)
        except Exception:  # a bug must not end the worker; no user is waiting on it
            log.exception("mirroring %s failed", item.request_id)
            outcome = "error"
        self.metrics.mirror_requests.labels(outcome).inc()

    async def run(self, item: MirrorItem) -> str:
        """Ask the challenger, score and record its answer; the outcome label."""
        engine = self.router.engines.get(Role.CHALLENGER)
        if engine is None or engine.breaker.current_state() == "open":
            return "dropped"
        request = unstreamed(item.request)
        trace = Trace(
            request_id=item.request_id + MIRROR_SUFFIX,
            arrived=time.time(),
            started=self.clock(),
            arm=Role.CHALLENGER,
            user_hash=item.user_hash,
            served_by=MIRROR,
        )
        call = self.student.prepare(request, trace, engine)
        data = await self._call(call, request, trace)
        if data is not None:
            endpoint = request.endpoint
            # `fallback_reason` says what the gateway would have done; nothing falls back.
            tokens = responses.token_logprobs(data, endpoint)
            decision = self.student.decide(call, trace, tokens)
            trace.answer = responses.answer_text(data, endpoint)
            trace.prompt_tokens, trace.completion_tokens = responses.usage_counts(data)
            if not decision.fall_back:  # as for a student: only answers it would serve
                self.student.served_json(call, trace, data, endpoint, tokens)
        self.recorder.record_mirror(request, trace)
        return "ok" if data is not None else "error"

    async def _call(
        self, call: StudentCall, request: ParsedRequest, trace: Trace
    ) -> dict[str, Any] | None:
        """One call, outside the breaker but counted in flight (a hot swap drains the engine it
        replaces); None (and the trace says why) when it failed."""
        engine = call.engine
        try:
            with engine.use():
                return await self.client.post_json(
                    engine, UPSTREAM_PATHS[request.endpoint], call.body, self.timeout_s
                )
        except UpstreamFailure as failure:
            trace.fallback_reason = failure.reason
            trace.status, trace.error = 502, f"challenger (mirrored): {failure}"[:500]
        except ClientError as exc:  # the challenger rejected what the champion answered
            trace.status, payload = error_body(exc)
            trace.error = payload["error"]["message"][:500]
        finally:
            trace.upstream_s = self.clock() - trace.started
        return None
