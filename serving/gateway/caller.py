"""Calling an engine for a user's request: circuit breaker, bounded attempts, the request's
deadline, and in-flight accounting.

    data = await caller.post_json(engine, trace, path, body, retry_timeouts=False)
    with await caller.open_stream(engine, trace, path, body, retry_timeouts=True) as stream:
        async for event in stream.events: ...

Both count the request on `engine.in_flight` for as long as it uses the engine (a stream until
it is closed), which is what a hot swap drains on. The mirror calls engines without this (no
breaker verdicts, no deadline): see mirror.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from stillhouse.common.config import FallbackSettings
from stillhouse.serving.gateway.metrics import GatewayMetrics
from stillhouse.serving.gateway.trace import Trace
from stillhouse.serving.gateway.upstream import Engine, UpstreamClient, UpstreamFailure, sse_events

Events = AsyncIterator[dict[str, Any] | None]


class EngineStream:
    """An engine's streamed answer, open: counted in flight on the engine until `close()`."""

    __slots__ = ("engine", "events", "response")

    def __init__(self, engine: Engine, response: aiohttp.ClientResponse) -> None:
        self.engine = engine
        self.response: aiohttp.ClientResponse | None = response
        self.events: Events = sse_events(response)

    def close(self) -> None:
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
    ) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.clock = clock

    def attempt_timeout(self, trace: Trace) -> float:
        """The next attempt's timeout: the per-attempt limit, cut to what is left of the
        request's deadline. Raises `UpstreamFailure("timeout")` once the deadline has passed."""
        remaining = self.settings.deadline_s - (self.clock() - trace.started)
        if remaining <= 0:
            raise UpstreamFailure("timeout", "the request's deadline passed")
        return min(self.settings.attempt_timeout_s, remaining)

    def failed(self, engine: Engine) -> None:
        """The engine failed this request (also mid-stream): its breaker and metrics hear it."""
        engine.breaker.record_failure()
        self.metrics.engine_failures.labels(engine.role).inc()
        self.export_breaker(engine)

    def export_breaker(self, engine: Engine) -> None:
        # current_state(): an elapsed cool-down reads half-open
        self.metrics.export_breaker(engine.role, engine.breaker.current_state())

    async def post_json(
        self, engine: Engine, trace: Trace, path: str, body: dict[str, Any], *, retry_timeouts: bool
    ) -> dict[str, Any]:
        """One JSON answer; raises the last `UpstreamFailure` (or the engine's client error)."""
        with engine.use():
            return await self._attempts(
                engine,
                trace,
                lambda t: self.client.post_json(engine, path, body, t),
                retry_timeouts,
            )

    async def open_stream(
        self, engine: Engine, trace: Trace, path: str, body: dict[str, Any], *, retry_timeouts: bool
    ) -> EngineStream:
        """A streamed answer, its headers in; the caller closes it (`with` or `close()`)."""
        engine.acquire()
        try:
            response = await self._attempts(
                engine,
                trace,
                lambda t: self.client.open_stream(engine, path, body, t),
                retry_timeouts,
            )
        except BaseException:
            engine.release()
            raise
        return EngineStream(engine, response)

    async def _attempts(
        self,
        engine: Engine,
        trace: Trace,
        attempt: Callable[[float], Awaitable[Any]],
        retry_timeouts: bool,
    ) -> Any:
        """Run `attempt(timeout)` with bounded retries inside the deadline, under the engine's
        circuit breaker. Raises the last `UpstreamFailure`."""
        tries = 1 + self.settings.retries
        last = UpstreamFailure("circuit_open", f"{engine.role} circuit is open")
        for _ in range(tries):
            # A passed deadline is no fault of the engine: checked before its breaker is asked.
            timeout = self.attempt_timeout(trace)
            if not engine.breaker.allow():
                self.export_breaker(engine)
                raise last
            started = self.clock()
            try:
                result = await attempt(timeout)
            except UpstreamFailure as failure:
                self.failed(engine)
                last = failure
                if failure.reason == "timeout" and not retry_timeouts:
                    break
                continue
            except BaseException:  # the client's 4xx, a cancel: no verdict on the engine
                engine.breaker.release_probe()
                raise
            finally:
                trace.upstream_s += self.clock() - started
            engine.breaker.record_success()
            self.export_breaker(engine)
            return result
        raise last
