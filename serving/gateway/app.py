"""The gateway's HTTP surface and its composition root, `build_app`.

    POST /v1/chat/completions, /v1/completions    OpenAI API (streaming and not), client key
    GET  /v1/models                               the one logical model, client key
    GET  /healthz, /readyz, /metrics              liveness, engine readiness, Prometheus
    GET|POST /admin/ab                            the A/B share and seed, the mirror share
                                                  (serving/mirror.py), admin key

Routes are thin: authenticate, read, parse, hand over to `Gateway`, write. Every exception
becomes OpenAI's error JSON in one place (`errors.error_body`, through the middleware).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

from stillhouse.common.config import Settings
from stillhouse.common.errors import ConfigError
from stillhouse.common.traffic import AbChange, TrafficLogReader
from stillhouse.serving.gateway.assignment import USER_HEADER, user_key
from stillhouse.serving.gateway.breaker import CircuitBreaker
from stillhouse.serving.gateway.core import SSE_DONE, AbState, Gateway, StreamSink, Trace
from stillhouse.serving.gateway.errors import (
    AuthenticationFailed,
    ClientError,
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    error_body,
)
from stillhouse.serving.gateway.metrics import GatewayMetrics, engine_sd_targets
from stillhouse.serving.gateway.mirror import Mirror
from stillhouse.serving.gateway.requests import Endpoint, ParsedRequest, decode_json, parse_request
from stillhouse.serving.gateway.shadow import ShadowScorer
from stillhouse.serving.gateway.streaming import stream_answer
from stillhouse.serving.gateway.traffic_log import TrafficLogWriter
from stillhouse.serving.gateway.upstream import Engine, UpstreamClient

log = logging.getLogger("stillhouse.gateway")

GATEWAY = web.AppKey("gateway", Gateway)
KEYS = web.AppKey("keys", "Keys")
STARTED = web.AppKey("started", float)
MIRROR = web.AppKey("mirror", Mirror)
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ENGINE_ROLES = ("teacher", "champion", "challenger")


@dataclass(frozen=True)
class EngineEndpoint:
    """Where one role's engine answers (`base_url` ends in /v1) and what it is."""

    base_url: str
    served_name: str
    ref: str


@dataclass(frozen=True)
class Keys:
    clients: tuple[bytes, ...]
    admin: bytes | None


def load_keys(settings: Settings, environ: Mapping[str, str]) -> Keys:
    """Client keys (comma-separated) and the admin key from the environment, never from YAML.
    Without client keys the gateway only listens on loopback."""
    gw = settings.gateway
    clients = tuple(
        k.strip().encode() for k in environ.get(gw.api_keys_env, "").split(",") if k.strip()
    )
    admin = environ.get(gw.admin_key_env, "").strip().encode() or None
    if not clients and not _is_loopback(gw.host):
        raise ConfigError(
            f"gateway.host is {gw.host}, but ${gw.api_keys_env} is empty: "
            "set client API keys before listening beyond loopback"
        )
    return Keys(clients, admin)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bearer(request: web.Request) -> bytes:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


def _matches(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    # Compare against every key, constant time each, so timing says nothing about which or how
    # much of a key matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


def authorize_client(request: web.Request) -> None:
    keys = request.app[KEYS]
    if keys.clients and not _matches(_bearer(request), keys.clients):
        raise AuthenticationFailed(
            "invalid or missing API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


def authorize_admin(request: web.Request) -> None:
    keys = request.app[KEYS]
    if keys.admin is None:
        raise PermissionDenied(
            "the admin API is disabled: set the admin key in the gateway's environment"
        )
    if not _matches(_bearer(request), (keys.admin,)):
        raise AuthenticationFailed("invalid or missing admin key", code="invalid_api_key")


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None):
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        status, body = error_body(exc)
        return json_response(body, status)
    except web.HTTPException as exc:
        status, body = error_body(_from_http(exc))
        return json_response(body, status)
    except Exception as exc:
        log.exception("unhandled error on %s %s", request.method, request.path)
        status, body = error_body(exc)
        return json_response(body, status)


def _from_http(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return NotFound("unknown path; see /v1/chat/completions, /v1/completions, /v1/models")
    if exc.status == 413:
        return PayloadTooLarge("the request body is too large")
    error = ClientError(exc.reason)
    error.status = exc.status
    return error


class HttpSink(StreamSink):
    def __init__(self, request: web.Request):
        self.request = request
        self.response: web.StreamResponse | None = None

    async def start(self, status: int, headers: dict[str, str]) -> None:
        self.response = web.StreamResponse(status=status, headers=headers)
        self.response.content_type = "text/event-stream"
        self.response.headers["cache-control"] = "no-cache"
        await self.response.prepare(self.request)

    async def send(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"the request body exceeds {request.app[GATEWAY].settings.max_body_bytes} bytes"
        ) from None


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.match(given) else uuid.uuid4().hex


async def completions(endpoint: Endpoint, request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    authorize_client(request)
    raw = await _read_body(request)
    request_id = _request_id(request)
    header_user = request.headers.get(USER_HEADER)
    try:
        parsed = parse_request(raw, endpoint, gw.settings.model_name, gw.settings.max_tokens_limit)
    except ClientError as exc:
        trace = gw.new_trace(request_id, user_key(None, header_user, request_id))
        return await _failed(gw, None, endpoint, trace, exc)
    trace = gw.new_trace(request_id, user_key(parsed.user, header_user, request_id))
    if parsed.stream:
        return await _stream(gw, parsed, trace, request)
    try:
        reply = await gw.complete(parsed, trace)
    except Exception as exc:
        return await _failed(gw, parsed, endpoint, trace, exc)
    await gw.finish(parsed, trace, endpoint)
    request.app[MIRROR].offer(parsed, trace)  # after the answer is decided; never waits
    return json_response(reply.body, reply.status, reply.headers)


async def _failed(
    gw: Gateway, parsed: ParsedRequest | None, endpoint: Endpoint, trace: Trace, exc: Exception
) -> web.Response:
    """The error answer for a request that failed before any byte was sent, recorded."""
    if not isinstance(exc, GatewayError):
        log.error("request %s failed", trace.request_id, exc_info=exc)
    body = gw.fail(trace, exc)
    await gw.finish(parsed, trace, endpoint)
    return json_response(body, trace.status, gw.route_headers(trace))


async def _stream(
    gw: Gateway, parsed: ParsedRequest, trace: Trace, request: web.Request
) -> web.StreamResponse:
    sink = HttpSink(request)
    try:
        complete = await stream_answer(gw, parsed, trace, sink)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        trace.status, trace.error = 499, "the client closed the connection"
        await gw.finish(parsed, trace, parsed.endpoint)
        assert sink.response is not None
        return sink.response
    except Exception as exc:
        if sink.response is None:
            return await _failed(gw, parsed, parsed.endpoint, trace, exc)
        log.error("stream %s failed", trace.request_id, exc_info=exc)
        gw.fail(trace, exc)
        complete = False
    await gw.finish(parsed, trace, parsed.endpoint)
    request.app[MIRROR].offer(parsed, trace)  # after the answer is decided; never waits
    assert sink.response is not None
    try:
        if complete:
            await sink.send(SSE_DONE)
        await sink.response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass
    return sink.response


async def models(request: web.Request) -> web.Response:
    authorize_client(request)
    gw = request.app[GATEWAY]
    return json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": gw.settings.model_name,
                    "object": "model",
                    "created": int(request.app[STARTED]),
                    "owned_by": "stillhouse",
                }
            ],
        }
    )


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when someone can answer: the teacher or the champion responds to /v1/models."""
    gw = request.app[GATEWAY]
    snapshot = dict(gw.engines)  # a hot swap may change the table while the checks run
    roles = list(snapshot)
    checks = await asyncio.gather(
        *(gw.client.get_ok(snapshot[r].base_url + "/models", 2.0) for r in roles)
    )
    engines = {
        role: {"up": ok, "circuit": snapshot[role].breaker.current_state()}
        for role, ok in zip(roles, checks, strict=True)
    }
    ready = engines["teacher"]["up"] or engines["champion"]["up"]
    return json_response({"ready": ready, "engines": engines}, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    m = gw.metrics
    m.traffic_log_pending.set(gw.writer.pending)
    if gw.shadow is not None:
        m.shadow_queue_depth.set(gw.shadow.queue.qsize())
    request.app[MIRROR].export()
    for engine in gw.engines.values():
        gw.export_breaker(engine)
    return web.Response(
        body=generate_latest(m.registry), headers={"content-type": CONTENT_TYPE_LATEST}
    )


def _ab_state(gw: Gateway) -> dict[str, Any]:
    return {
        "challenger_share": gw.ab.share,
        "seed": gw.ab.seed,
        "mirror_share": gw.ab.mirror,
        "has_challenger": "challenger" in gw.engines,
    }


async def admin_ab(request: web.Request) -> web.Response:
    authorize_admin(request)
    gw = request.app[GATEWAY]
    if request.method == "GET":
        return json_response(_ab_state(gw))
    body = decode_json(await _read_body(request))
    unknown = sorted(set(body) - {"challenger_share", "seed", "mirror_share", "actor"})
    if unknown:
        raise InvalidRequest(f"unrecognized argument: {unknown[0]}", param=unknown[0])
    share = body.get("challenger_share", gw.ab.share)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise InvalidRequest(
            "'challenger_share' must be a number in [0, 1]", param="challenger_share"
        )
    seed = body.get("seed", gw.ab.seed)
    if not isinstance(seed, str) or not seed:
        raise InvalidRequest("'seed' must be a non-empty string", param="seed")
    mirror = body.get("mirror_share", gw.ab.mirror)
    if isinstance(mirror, bool) or not isinstance(mirror, int | float) or not 0 <= mirror <= 1:
        raise InvalidRequest("'mirror_share' must be a number in [0, 1]", param="mirror_share")
    actor = body.get("actor", "admin-api")
    if not isinstance(actor, str) or not actor or len(actor) > 100:
        raise InvalidRequest("'actor' must be a short string", param="actor")
    previous = {"challenger_share": gw.ab.share, "seed": gw.ab.seed, "mirror_share": gw.ab.mirror}
    # A mirror-only change moves no user between arms: it is no `AbChange` (the split's trail).
    if "mirror_share" not in body or {"challenger_share", "seed"} & set(body):
        await gw.set_ab(float(share), seed, actor)
    if "mirror_share" in body:
        request.app[MIRROR].set_share(float(mirror), actor)
    return json_response({**_ab_state(gw), "previous": previous})


def record_starting_split(
    path: Path, writer: TrafficLogWriter, ab: AbState, has_challenger: bool
) -> None:
    """Log the split this process starts with (share 0 without a challenger engine), so the
    sample-ratio check knows the share in force for every request, across restarts too."""
    with TrafficLogReader(path) as reader:
        changes = reader.ab_changes()
    share = ab.share if has_challenger else 0.0
    last = changes[-1] if changes else None
    previous = (last.share, last.seed) if last else (share, ab.seed)
    writer.submit(AbChange(time.time(), share, ab.seed, previous[0], previous[1], "gateway-start"))


async def metrics_engines(request: web.Request) -> web.Response:
    """Prometheus HTTP service discovery: where each engine's vLLM /metrics is, by role."""
    engines = request.app[GATEWAY].engines
    return json_response(engine_sd_targets({r: e.base_url for r, e in engines.items()}))


def build_app(
    settings: Settings,
    endpoints: Mapping[str, EngineEndpoint],
    environ: Mapping[str, str],
    *,
    metrics_registry=None,
) -> web.Application:
    """The composition root: one Gateway with its engines, writer, shadow scorer and metrics.
    `endpoints` needs `teacher` and `champion`; `challenger` is optional."""
    missing = [r for r in ("teacher", "champion") if r not in endpoints]
    if missing:
        raise ConfigError(f"the gateway needs a {missing[0]} engine")
    unknown = sorted(set(endpoints) - set(ENGINE_ROLES))
    if unknown:
        raise ConfigError(f"unknown engine role {unknown[0]!r}; expected one of {ENGINE_ROLES}")
    gws = settings.gateway
    keys = load_keys(settings, environ)
    disable_created_metrics()  # `*_created` series double the scrape for nothing a panel uses
    metrics_ = GatewayMetrics(metrics_registry)
    engines = {
        role: Engine(
            role,
            ep.base_url.rstrip("/"),
            ep.served_name,
            ep.ref,
            CircuitBreaker(
                gws.fallback.breaker_failures, gws.fallback.breaker_cooldown_s, time.monotonic
            ),
        )
        for role, ep in endpoints.items()
    }
    writer = TrafficLogWriter(
        settings.traffic_log_path,
        flush_interval_s=gws.traffic_log.flush_interval_ms / 1000,
        strict=gws.traffic_log.sync == "strict",
        on_commit=lambda n, s: (
            metrics_.traffic_log_committed.inc(n),
            metrics_.traffic_log_commit.observe(s),
        ),
        on_error=lambda exc: metrics_.traffic_log_write_errors.inc(),
    )
    engine_key = settings.engine.api_key.get_secret_value() if settings.engine.api_key else None
    client = UpstreamClient(None, engine_key)  # its session opens with the app, on its loop
    shadow = None
    if gws.shadow.fraction > 0:
        shadow = ShadowScorer(gws.shadow, engines["teacher"], client, writer, metrics_)
    ab = AbState(gws.ab.challenger_share, gws.ab.seed, gws.ab.mirror_share)
    gw = Gateway(gws, engines, client, metrics_, writer, shadow, ab)
    app = web.Application(client_max_size=gws.max_body_bytes, middlewares=[error_middleware])
    app[GATEWAY] = gw
    app[KEYS] = keys
    app[STARTED] = time.time()
    mirror = app[MIRROR] = Mirror(gw)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        client.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        await asyncio.to_thread(writer.start)
        await asyncio.to_thread(record_starting_split, settings.traffic_log_path, writer, ab,
                                "challenger" in engines)  # fmt: skip
        if shadow is not None:
            shadow.start()
        mirror.start()
        mirror.export()
        metrics_.challenger_share.set(ab.share if "challenger" in engines else 0.0)
        for engine in engines.values():
            gw.export_breaker(engine)
        try:
            yield
        finally:
            await mirror.stop()
            if shadow is not None:
                await shadow.stop()
            await client.session.close()
            await asyncio.to_thread(writer.close)

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", partial(completions, "chat"))
    app.router.add_post("/v1/completions", partial(completions, "completions"))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/metrics/engines", metrics_engines)
    app.router.add_route("GET", "/admin/ab", admin_ab)
    app.router.add_route("POST", "/admin/ab", admin_ab)
    return app
