"""The gateway's parts, built and wired once: `build_gateway` (called by `app.build_app`).

    router     engines table, A/B split, mirror share, hot swap (router.py)
    caller     breaker, attempts, deadline, in-flight (caller.py)
    recorder   trace → traffic record and metrics, shadow offers (recorder.py)
    path       the user-facing request path over those (request_path.py, streaming.py)
    mirror     the challenger's mirrored traffic (mirror.py)

`Gateway.start` / `stop` run with the app (its session, writer thread and worker pools).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from prometheus_client import CollectorRegistry

from stillhouse.common.config import GatewaySettings, Settings
from stillhouse.common.errors import ConfigError
from stillhouse.common.roles import ROLES, Role
from stillhouse.common.traffic import AbChange, TrafficLogReader
from stillhouse.serving.gateway.caller import EngineCaller
from stillhouse.serving.gateway.load import Shedder
from stillhouse.serving.gateway.metrics import GatewayMetrics
from stillhouse.serving.gateway.mirror import Mirror
from stillhouse.serving.gateway.recorder import Recorder
from stillhouse.serving.gateway.request_path import RequestPath
from stillhouse.serving.gateway.router import AbState, Router
from stillhouse.serving.gateway.shadow import ShadowScorer
from stillhouse.serving.gateway.student import StudentStep
from stillhouse.serving.gateway.traffic_log import TrafficLogWriter
from stillhouse.serving.gateway.upstream import Engine, UpstreamClient, new_engine


@dataclass(frozen=True)
class EngineEndpoint:
    """Where one role's engine answers (`base_url` ends in /v1) and what it is."""

    base_url: str
    served_name: str
    ref: str


@dataclass(frozen=True)
class Gateway:
    """The gateway's parts; the routes, `/admin/engines` and the model watcher use them."""

    settings: Settings
    metrics: GatewayMetrics
    writer: TrafficLogWriter
    client: UpstreamClient
    router: Router
    caller: EngineCaller
    recorder: Recorder
    path: RequestPath
    mirror: Mirror
    shadow: ShadowScorer | None
    shedder: Shedder

    async def start(self) -> None:
        self.client.session = aiohttp.ClientSession(
            # No pool limit: the budgets in load.py bound the requests, and a pool limit
            # would queue silently behind them.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        await asyncio.to_thread(self.writer.start)
        await asyncio.to_thread(self._record_starting_split)
        if self.shadow is not None:
            self.shadow.start()
        self.mirror.start()
        self.export_gauges()

    async def stop(self) -> None:
        await self.mirror.stop()
        if self.shadow is not None:
            await self.shadow.stop()
        await self.client.session.close()
        await asyncio.to_thread(self.writer.close)

    def export_gauges(self) -> None:
        """The gauges that are read rather than counted; before each scrape."""
        m = self.metrics
        m.traffic_log_pending.set(self.writer.pending)
        if self.shadow is not None:
            m.shadow_queue_depth.set(self.shadow.pool.depth)
        self.router.export_shares()
        self.shedder.export_gauges()
        for engine in self.router.engines.values():
            self.caller.export_breaker(engine)

    def _record_starting_split(self) -> None:
        """Log the split this process starts with (share 0 without a challenger engine), so
        the sample-ratio check knows the share in force for every request, across restarts."""
        ab = self.router.ab
        with TrafficLogReader(self.settings.traffic_log_path) as reader:
            changes = reader.ab_changes()
        share = self.router.share_in_force
        last = changes[-1] if changes else None
        previous = (last.share, last.seed) if last else (share, ab.seed)
        self.writer.submit(
            AbChange(time.time(), share, ab.seed, previous[0], previous[1], "gateway-start")
        )


def engines_from(
    endpoints: Mapping[str, EngineEndpoint], settings: GatewaySettings
) -> dict[Role, Engine]:
    """One engine per role; `teacher` and `champion` are required, `challenger` optional."""
    missing = [r for r in (Role.TEACHER, Role.CHAMPION) if r not in endpoints]
    if missing:
        raise ConfigError(f"the gateway needs a {missing[0]} engine")
    unknown = sorted(set(endpoints) - set(ROLES))
    if unknown:
        expected = tuple(str(r) for r in ROLES)
        raise ConfigError(f"unknown engine role {unknown[0]!r}; expected one of {expected}")
    return {
        Role(role): new_engine(Role(role), ep.base_url, ep.served_name, ep.ref, settings)
        for role, ep in endpoints.items()
    }


def traffic_log_writer(settings: Settings, metrics: GatewayMetrics) -> TrafficLogWriter:
    log_settings = settings.gateway.traffic_log

    def committed(n: int, seconds: float) -> None:
        metrics.traffic_log_committed.inc(n)
        metrics.traffic_log_commit.observe(seconds)

    return TrafficLogWriter(
        settings.traffic_log_path,
        flush_interval_s=log_settings.flush_interval_ms / 1000,
        strict=log_settings.sync == "strict",
        on_commit=committed,
        on_lost=metrics.traffic_log_write_errors.inc,
        max_pending=log_settings.max_pending_records,
        max_pending_bytes=log_settings.max_pending_bytes,
        retention_days=log_settings.retention_days,
    )


def build_gateway(
    settings: Settings,
    endpoints: Mapping[str, EngineEndpoint],
    metrics_registry: CollectorRegistry | None,
    user_hash_key: bytes,
) -> Gateway:
    gws = settings.gateway
    engines = engines_from(endpoints, gws)
    metrics = GatewayMetrics(metrics_registry)
    writer = traffic_log_writer(settings, metrics)
    engine_key = settings.engine.key
    client = UpstreamClient(None, engine_key)  # its session opens with the app, on its loop
    shadow = None
    if gws.shadow.fraction > 0:
        shadow = ShadowScorer(gws.shadow, engines[Role.TEACHER], client, writer, metrics)
    rng, clock = random.Random(), time.monotonic
    ab = AbState(gws.ab.challenger_share, gws.ab.seed, gws.ab.mirror_share)
    router = Router(engines, ab, writer, metrics)
    caller = EngineCaller(gws.fallback, client, metrics, clock, rng)
    recorder = Recorder(gws, metrics, writer, shadow, rng, clock, user_hash_key)
    student = StudentStep(gws.confidence.top_k, recorder)
    shedder = Shedder(gws.fallback, metrics)
    path = RequestPath(
        router,
        caller,
        student,
        recorder,
        shedder,
        gws.model_name,
        gws.confidence.hold_tokens,
        gws.max_tokens_limit,
    )
    mirror = Mirror(gws, router, student, client, recorder, metrics, rng, clock)
    return Gateway(
        settings, metrics, writer, client, router, caller, recorder, path, mirror, shadow, shedder
    )
