"""The floor for a Python gateway on this machine: an aiohttp server that hands each request's
body bytes to the upstream through one shared, keep-alive aiohttp client session and returns the
upstream's bytes. No parsing, no logic. uvloop is used when installed (uvicorn does the same).

    .venv/bin/python tests/bench/gateway_bench_support/thin_proxy.py --port 8001 \\
        --upstream http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web


def build_app(upstream: str) -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application):
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=300)
        async with aiohttp.ClientSession(upstream, connector=connector) as session:
            app["session"] = session
            yield

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        async with app["session"].request(
            request.method,
            request.rel_url,
            data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as upstream_response:
            data = await upstream_response.read()
            return web.Response(
                body=data,
                status=upstream_response.status,
                content_type=upstream_response.content_type,
            )

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="scheme://host:port, no path")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args()
    loop = "asyncio"
    if args.loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if args.loop == "uvloop":
                raise
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            loop = "uvloop"
    print(f"thin proxy on 127.0.0.1:{args.port} -> {args.upstream} ({loop})", flush=True)
    web.run_app(
        build_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None
    )


if __name__ == "__main__":
    main()
