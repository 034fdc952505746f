"""Calling an engine for a user's request: circuit breaker, bounded attempts, the request's
deadline, and in-flight accounting.

    data = await caller.post_json(engine, trace, path, body, max_tokens=256)
    with await caller.open_stream(engine, trace, path, body) as stream:
        async for event in stream.events: ...
        stream.succeeded()        # or stream.failed(); closing without a verdict judges nothing

The breaker hears one verdict per attempt, on its whole outcome: a JSON answer once its body is
in, a stream when it ends (a stream whose headers came but whose tokens never did is a failure).
Both count the request on `engine.in_flight` for as long as it uses the engine (a stream until
it is closed), which is what a hot swap drains on. The mirror calls engines without this (no
breaker verdicts, no deadline): see mirror.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from stillhouse.common.config import FallbackSettings
from stillhouse.common.roles import Role
from stillhouse.serving.gateway.breaker import Permit
from stillhouse.serving.gateway.metrics import GatewayMetrics
from stillhouse.serving.gateway.trace import Trace
from stillhouse.serving.gateway.upstream import Engine, UpstreamClient, UpstreamFailure, sse_events

Events = AsyncIterator[dict[str, Any] | None]


class EngineStream:
    """An engine's streamed answer, open: counted in flight on the engine until `close()`.
    Its breaker verdict is given once, by `succeeded()` or `failed()`; a stream closed without
    one (the client went away, the gateway chose the teacher) judges nothing."""

    __slots__ = ("_caller", "_permit", "engine", "events", "response")

    def __init__(
        self, caller: EngineCaller, engine: Engine, permit: Permit, response: aiohttp.ClientResponse
    ) -> None:
        self._caller = caller
        self._permit: Permit | None = permit
        self.engine = engine
        self.response: aiohttp.ClientResponse | None = response
        fb = caller.settings
        self.events: Events = sse_events(response, fb.stream_idle_timeout_s, fb.max_event_bytes)

    def succeeded(self) -> None:
        if self._permit is not None:
            self._caller.succeeded(self.engine, self._permit)
            self._permit = None

    def failed(self) -> None:
        if self._permit is not None:
            self._caller.failed(self.engine, self._permit)
            self._permit = None

    def close(self) -> None:
        if self._permit is not None:
            self.engine.breaker.release(self._permit)
            self._permit = None
        if self.response is not None:
            self.response.close()
            self.response = None
            self.engine.release()

    def __enter__(self) -> EngineStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EngineCaller:
    """Calls engines on behalf of users' requests (the transports in request_path.py and
    streaming.py); the mirror calls them without it."""

    def __init__(
        self,
        settings: FallbackSettings,
        client: UpstreamClient,
        metrics: GatewayMetrics,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self.rng = rng or random.Random()

    def remaining(self, trace: Trace) -> float:
        """What is left of the request's deadline. Raises `UpstreamFailure("deadline")` once
        it has passed (no fault of any engine: no breaker hears it)."""
        remaining = self.settings.deadline_s - (self.clock() - trace.started)
        if remaining <= 0:
            raise UpstreamFailure("deadline", "the request's deadline passed")
        return remaining

    def attempt_timeout(
        self, trace: Trace, max_tokens: int | None = None, engine: Engine | None = None
    ) -> float:
        """The next attempt's timeout, cut to what is left of the deadline: `attempt_timeout_s`
        for the first tokens, plus the generation time of `max_tokens` at `min_tokens_per_s`
        for a non-streamed answer (its headers come only when it is whole). The teacher, which
        nothing falls back from, gets all that is left: the attempt timeout exists to leave
        time for a fallback, and cutting the last resort short only turns a slow answer into
        a 503 (seen in the demo: a teacher busy with calibration timed out at 20 s)."""
        remaining = self.remaining(trace)
        if engine is not None and engine.role == Role.TEACHER:
            return remaining
        limit = self.settings.attempt_timeout_s
        if max_tokens is not None:
            limit += max_tokens / self.settings.min_tokens_per_s
        return min(limit, remaining)

    def failed(self, engine: Engine, permit: Permit) -> None:
        """The engine failed this attempt (also mid-stream): its breaker and metrics hear it."""
        engine.breaker.record_failure(permit)
        self.metrics.engine_failures.labels(engine.role).inc()
        self.export_breaker(engine)

    def succeeded(self, engine: Engine, permit: Permit) -> None:
        engine.breaker.record_success(permit)
        self.export_breaker(engine)

    def export_breaker(self, engine: Engine) -> None:
        # current_state(): an elapsed cool-down reads half-open
        self.metrics.export_breaker(engine.role, engine.breaker.current_state())

    async def post_json(
        self,
        engine: Engine,
        trace: Trace,
        path: str,
        body: dict[str, Any],
        *,
        max_tokens: int,
        judged: Callable[[UpstreamFailure], bool] | None = None,
    ) -> dict[str, Any]:
        """One JSON answer; raises the last `UpstreamFailure` (or the engine's client error).
        `judged(failure)` False: that failure is not held against the engine."""
        with engine.use():
            data, permit = await self._attempts(
                engine,
                trace,
                lambda t: self.client.post_json(engine, path, body, t),
                max_tokens,
                judged,
            )
        self.succeeded(engine, permit)
        return data

    async def open_stream(
        self,
        engine: Engine,
        trace: Trace,
        path: str,
        body: dict[str, Any],
        *,
        judged: Callable[[UpstreamFailure], bool] | None = None,
    ) -> EngineStream:
        """A streamed answer, its headers in; the caller gives the verdict and closes it."""
        engine.acquire()
        try:
            response, permit = await self._attempts(
                engine,
                trace,
                lambda t: self.client.open_stream(engine, path, body, t),
                None,
                judged,
            )
        except BaseException:
            engine.release()
            raise
        return EngineStream(self, engine, permit, response)

    async def _attempts(
        self,
        engine: Engine,
        trace: Trace,
        attempt: Callable[[float], Awaitable[Any]],
        max_tokens: int | None,
        judged: Callable[[UpstreamFailure], bool] | None,
    ) -> tuple[Any, Permit]:
        """Run `attempt(timeout)` under the engine's circuit breaker, inside the deadline;
        a connection error is retried after a back-off, anything else is final. Returns the
        result and its breaker permit (the verdict is the caller's); raises the last
        `UpstreamFailure`."""
        last = UpstreamFailure("circuit_open", f"{engine.role} circuit is open")
        for try_index in range(1 + self.settings.retries):
            if try_index:
                await self._back_off(trace, try_index)
            # A passed deadline is no fault of the engine: checked before its breaker is asked.
            timeout = self.attempt_timeout(trace, max_tokens, engine)
            permit = engine.breaker.allow()
            if permit is None:
                self.export_breaker(engine)
                raise last
            started = self.clock()
            try:
                result = await attempt(timeout)
            except UpstreamFailure as failure:
                if judged is None or judged(failure):
                    self.failed(engine, permit)
                else:
                    engine.breaker.release(permit)
                last = failure
                if failure.reason == "connection":
                    continue
                break
            except BaseException:  # the client's 4xx, a cancel: no verdict on the engine
                engine.breaker.release(permit)
                raise
            finally:
                trace.upstream_s += self.clock() - started
            return result, permit
        raise last

    async def _back_off(self, trace: Trace, try_index: int) -> None:
        """Wait before retry `try_index` (1, 2, ...): the back-off doubled each time, with
        full jitter, never past the deadline."""
        base = self.settings.retry_backoff_s * 2 ** (try_index - 1)
        delay = min(self.rng.uniform(0, base), max(0.0, self.remaining(trace) - 0.01))
        if delay > 0:
            await asyncio.sleep(delay)
