"""The gateway's HTTP surface and its composition root, `build_app`.

    POST /v1/chat/completions, /v1/completions    OpenAI API (streaming and not), client key
    GET  /v1/models                               the one logical model, client key
    GET  /healthz, /readyz, /metrics              liveness, engine readiness, Prometheus
    GET|POST /admin/ab                            the A/B share and seed, the mirror share
                                                  (serving/gateway/mirror.py), admin key

Routes are thin: authenticate, read, parse, hand over to the gateway's parts (parts.py), write.
Every exception becomes OpenAI's error JSON in one place (`errors.error_body`, through the
middleware).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from functools import partial
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)

from stillhouse.common.config import Settings
from stillhouse.common.roles import Role
from stillhouse.serving.gateway.assignment import USER_HEADER, user_key
from stillhouse.serving.gateway.auth import (
    KEYS,
    authorize_admin,
    authorize_client,
    load_keys,
    load_user_hash_key,
)
from stillhouse.serving.gateway.errors import (
    ClientError,
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    error_body,
    error_headers,
)
from stillhouse.serving.gateway.metrics import engine_sd_targets
from stillhouse.serving.gateway.parts import EngineEndpoint, Gateway, build_gateway
from stillhouse.serving.gateway.requests import Endpoint, ParsedRequest, decode_json, parse_request
from stillhouse.serving.gateway.streaming import SSE_DONE, StreamSink, sse, stream_answer
from stillhouse.serving.gateway.trace import Trace, route_headers

log = logging.getLogger("stillhouse.gateway")

GATEWAY = web.AppKey("gateway", Gateway)
STARTED = web.AppKey("started", float)
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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
        return json_response(body, status, error_headers(exc))
    except web.HTTPException as exc:
        status, body = error_body(_from_http(exc))
        return json_response(body, status)
    except Exception as exc:
        log.exception("unhandled error on %s %s", request.method, request.path)
        status, body = error_body(exc)
        return json_response(body, status)


class MalformedRequestLog(logging.Filter):
    """For aiohttp's `aiohttp.server` logger. A request aiohttp cannot parse (a control byte in
    a header, a broken request line) is answered 400 by aiohttp itself, which logs a traceback
    for each one: anyone could fill the error log without a key. This keeps one line per
    `interval_s` with the count instead."""

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self.unreported = 0
        self.last_report = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        self.unreported += 1
        now = self.clock()
        if now - self.last_report < self.interval_s:
            return False
        reason = str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__
        record.msg, record.args = (
            "answered 400 to %d malformed HTTP request(s) since the last report, e.g. %s",
            (self.unreported, reason[:200]),
        )
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self.unreported, self.last_report = 0, now
        return True


def admin_port_guard(admin_port: int) -> Callable:
    """With the admin API on its own port: /admin/* answers only there (404 elsewhere)."""

    @web.middleware
    async def guard(request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith("/admin"):
            sockname = request.transport.get_extra_info("sockname") if request.transport else None
            if not sockname or sockname[1] != admin_port:
                raise NotFound("unknown path; the admin API listens on its own port")
        return await handler(request)

    return guard


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
        limit = request.app[GATEWAY].settings.gateway.max_body_bytes
        raise PayloadTooLarge(f"the request body exceeds {limit} bytes") from None


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.match(given) else uuid.uuid4().hex


def _new_trace(gw: Gateway, request_id: str, key: str) -> Trace:
    return gw.recorder.new_trace(request_id, key, gw.router.assign(key))


def _header_user(request: web.Request) -> str | None:
    """The `x-stillhouse-user` header; a value that is not UTF-8 is the client's mistake."""
    value = request.headers.get(USER_HEADER)
    if value is not None and not _is_utf8(value):
        raise InvalidRequest(f"the {USER_HEADER} header must be UTF-8 text", param=USER_HEADER)
    return value


def _is_utf8(value: str) -> bool:
    # aiohttp decodes header bytes as UTF-8 with surrogate escapes (or as Latin-1): whatever
    # cannot be written back as UTF-8 was not UTF-8 on the wire.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def completions(endpoint: Endpoint, request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    authorize_client(request)
    with gw.shedder.request():  # past the gateway's budget: 503 with Retry-After, at once
        return await _completions(gw, endpoint, request)


async def _completions(gw: Gateway, endpoint: Endpoint, request: web.Request) -> web.StreamResponse:
    raw = await _read_body(request)
    request_id = _request_id(request)
    header_user = _header_user(request)
    gws = gw.settings.gateway
    try:
        parsed = parse_request(raw, endpoint, gws.model_name, gws.max_tokens_limit)
    except ClientError as exc:
        trace = _new_trace(gw, request_id, user_key(None, header_user, request_id))
        return await _failed(gw, None, endpoint, trace, exc)
    trace = _new_trace(gw, request_id, user_key(parsed.user, header_user, request_id))
    if parsed.stream:
        return await _stream(gw, parsed, trace, request)
    try:
        reply = await gw.path.complete(parsed, trace)
    except asyncio.CancelledError:
        # The client went away (aiohttp cancels the handler): the engine call is cancelled
        # with it, and the request is recorded as the client's.
        trace.status, trace.error = 499, "the client closed the connection"
        await asyncio.shield(gw.recorder.finish(parsed, trace, endpoint))
        raise
    except Exception as exc:
        return await _failed(gw, parsed, endpoint, trace, exc)
    await _answered(gw, parsed, trace)
    return json_response(reply.body, reply.status, reply.headers)


async def _answered(gw: Gateway, parsed: ParsedRequest, trace: Trace) -> None:
    """A request whose answer is decided: recorded, then maybe mirrored (never waits)."""
    await gw.recorder.finish(parsed, trace, parsed.endpoint)
    gw.mirror.offer(parsed, trace)


async def _failed(
    gw: Gateway, parsed: ParsedRequest | None, endpoint: Endpoint, trace: Trace, exc: Exception
) -> web.Response:
    """The error answer for a request that failed before any byte was sent, recorded."""
    if not isinstance(exc, GatewayError):
        log.error("request %s failed", trace.request_id, exc_info=exc)
    body = gw.recorder.fail(trace, exc)
    await gw.recorder.finish(parsed, trace, endpoint)
    return json_response(body, trace.status, {**route_headers(trace), **error_headers(exc)})


async def _stream(
    gw: Gateway, parsed: ParsedRequest, trace: Trace, request: web.Request
) -> web.StreamResponse:
    sink = HttpSink(request)
    try:
        complete = await stream_answer(gw.path, parsed, trace, sink)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        trace.status, trace.error = 499, "the client closed the connection"
        await gw.recorder.finish(parsed, trace, parsed.endpoint)
        assert sink.response is not None
        return sink.response
    except asyncio.CancelledError:
        trace.status, trace.error = 499, "the client closed the connection"
        await asyncio.shield(gw.recorder.finish(parsed, trace, parsed.endpoint))
        raise
    except Exception as exc:
        if sink.response is None:
            return await _failed(gw, parsed, parsed.endpoint, trace, exc)
        log.error("stream %s failed", trace.request_id, exc_info=exc)
        gw.recorder.fail(trace, exc)
        complete = False
    try:
        await _answered(gw, parsed, trace)
    except GatewayError as exc:  # strict mode, not recorded: the stream ends in an error
        _, body = error_body(exc)
        await sink.send(sse(body))
        complete = False
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
                    "id": gw.settings.gateway.model_name,
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
    snapshot = dict(gw.router.engines)  # a hot swap may change the table while checks run
    roles = list(snapshot)
    checks = await asyncio.gather(
        *(gw.client.get_ok(snapshot[r].base_url + "/models", 2.0) for r in roles)
    )
    engines = {  # str(role): orjson takes only plain-str keys
        str(role): {"up": ok, "circuit": snapshot[role].breaker.current_state()}
        for role, ok in zip(roles, checks, strict=True)
    }
    ready = engines[Role.TEACHER]["up"] or engines[Role.CHAMPION]["up"]
    return json_response({"ready": ready, "engines": engines}, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    gw.export_gauges()
    return web.Response(
        body=generate_latest(gw.metrics.registry), headers={"content-type": CONTENT_TYPE_LATEST}
    )


async def metrics_engines(request: web.Request) -> web.Response:
    """Prometheus HTTP service discovery: where each engine's vLLM /metrics is, by role."""
    engines = request.app[GATEWAY].router.engines
    return json_response(engine_sd_targets({r: e.base_url for r, e in engines.items()}))


def _ab_state(gw: Gateway) -> dict[str, Any]:
    ab = gw.router.ab
    challenger = gw.router.engines.get(Role.CHALLENGER)
    return {
        "challenger_share": ab.share,
        "seed": ab.seed,
        "mirror_share": ab.mirror,
        "has_challenger": gw.router.has_challenger,
        "share_in_force": gw.router.share_in_force,
        "share_refused": challenger.share_refused if challenger is not None else None,
    }


def _share(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidRequest(f"'{name}' must be a number in [0, 1]", param=name)
    return float(value)


async def admin_ab(request: web.Request) -> web.Response:
    authorize_admin(request)
    gw = request.app[GATEWAY]
    ab = gw.router.ab
    if request.method == "GET":
        return json_response(_ab_state(gw))
    body = decode_json(await _read_body(request))
    unknown = sorted(set(body) - {"challenger_share", "seed", "mirror_share", "actor"})
    if unknown:
        raise InvalidRequest(f"unrecognized argument: {unknown[0]}", param=unknown[0])
    share = _share(body, "challenger_share", ab.share)
    seed = body.get("seed", ab.seed)
    if not isinstance(seed, str) or not seed:
        raise InvalidRequest("'seed' must be a non-empty string", param="seed")
    mirror = _share(body, "mirror_share", ab.mirror)
    actor = body.get("actor", "admin-api")
    if not isinstance(actor, str) or not actor or len(actor) > 100:
        raise InvalidRequest("'actor' must be a short string", param="actor")
    previous = {"challenger_share": ab.share, "seed": ab.seed, "mirror_share": ab.mirror}
    # A mirror-only change moves no user between arms: it is no `AbChange` (the split's trail).
    if "mirror_share" not in body or {"challenger_share", "seed"} & set(body):
        await gw.router.set_split(share, seed, actor)
    if "mirror_share" in body:
        gw.router.set_mirror_share(mirror, actor)
    return json_response({**_ab_state(gw), "previous": previous})


def _add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", partial(completions, "chat"))
    app.router.add_post("/v1/completions", partial(completions, "completions"))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/metrics/engines", metrics_engines)
    app.router.add_route("GET", "/admin/ab", admin_ab)
    app.router.add_route("POST", "/admin/ab", admin_ab)


def build_app(
    settings: Settings,
    endpoints: Mapping[str, EngineEndpoint],
    environ: Mapping[str, str],
    *,
    metrics_registry: CollectorRegistry | None = None,
) -> web.Application:
    """The composition root: the gateway's parts (`parts.build_gateway`) behind its routes.
    `endpoints` needs `teacher` and `champion`; `challenger` is optional."""
    disable_created_metrics()  # `*_created` series double the scrape for nothing a panel uses
    keys = load_keys(settings, environ)
    user_hash_key = load_user_hash_key(settings, environ)
    # build_gateway checks the endpoints first
    gw = build_gateway(settings, endpoints, metrics_registry, user_hash_key)
    middlewares = [error_middleware]
    if settings.gateway.admin_port is not None:
        middlewares.append(admin_port_guard(settings.gateway.admin_port))
    app = web.Application(client_max_size=settings.gateway.max_body_bytes, middlewares=middlewares)
    app[GATEWAY] = gw
    app[KEYS] = keys
    app[STARTED] = time.time()

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app.cleanup_ctx.append(lifetime)
    _add_routes(app)
    return app
