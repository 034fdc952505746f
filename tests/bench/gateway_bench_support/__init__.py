"""Helpers for `tests/bench/bench_gateway.py`: the nginx stub upstream, the thin aiohttp
pass-through, the LiteLLM proxy in its own virtualenv, process handling and wrk."""
