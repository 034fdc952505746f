"""Gateway overhead and throughput against a fast stub upstream, side by side with the LiteLLM
proxy and a thin aiohttp pass-through, in one run (the machine is shared and noisy: only numbers
from the same run compare).

    make bench BENCH=gateway       # or: .venv/bin/python tests/bench/bench_gateway.py
    .venv/bin/python tests/bench/bench_gateway.py --duration 10 --skip-litellm

Needs `nginx` (Debian `nginx-light`) and `wrk`; `make bench` installs both with apt-get. The
LiteLLM proxy gets its own virtualenv under `.stillhouse/bench/litellm-venv`, made on first run
(`pip install 'litellm[proxy]'`, about a minute); without PyPI its row reads n/a.

What runs: nginx returns one fixed vLLM-style completion (with token log-probabilities, all high,
so the gateway never falls back to the teacher) as fast as it can, so whatever is in front of it
is the bottleneck. Four targets take the same POST /v1/chat/completions from wrk (one thread,
keep-alive connections), 1 client and then 16 clients for --duration seconds each, after a
1-second warm-up (a full run: about 1.5 minutes, plus about a minute the first time for
LiteLLM's virtualenv):

* direct: wrk straight to the stub, the baseline that overheads are measured against, measured
  first and last; per cell the lower latency of the two counts (other work on the machine only
  adds latency, so overheads err on the large side);
* thin pass-through: an aiohttp server and one keep-alive aiohttp client session that forward
  the bytes, no parsing, no logic: the floor for a Python gateway on this machine;
* LiteLLM: `litellm --num_workers 1`, one model, a master key, no database;
* ours: `stillhouse --config CFG serve` with routing, confidence scoring, metrics and the
  traffic log on (A/B share and shadow fraction 0: the challenger and the teacher are not
  asked); after the load its own /metrics show who answered (the champion, no fallbacks).

A target that does not start, or answers the first request with an error, reads n/a with the
reason; the others are still measured.

Overhead is a target's latency minus the stub's at the same percentile and client count; the
maximum throughput of one gateway process is its req/s at 16 clients. Every server and wrk share
the machine's two cores (they cannot be pinned apart), which weighs on all targets alike.

Goals (from the issue): ours >= 0.5x the thin pass-through's req/s, >= 20x LiteLLM's, and under
1 ms p50 overhead at 1 client. Reference (same kind of machine): LiteLLM 1.108 one worker
34-47 req/s, p50 28 ms at 1 client; thin pass-through ~2,350 req/s at 16 clients, p50 0.68 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from gateway_bench_support import litellm_target, stub, wrk
from gateway_bench_support.procs import Server, StartError, free_port
from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPO = Path(__file__).resolve().parents[2]
LITELLM_VENV = REPO / ".stillhouse" / "bench" / "litellm-venv"
KEY = "sk-bench"
CLIENTS = (1, 16)
WARMUP_S = 1
PROMPT = [{"role": "user", "content": "my invoice is wrong"}]
Starter = Callable[[], AbstractContextManager["Target"]]
OURS_CONFIG = """\
state_dir: {state_dir}
gateway:
  host: 127.0.0.1
  port: {port}
  engines:
    teacher: {{base_url: "{stub}"}}
    champion: {{base_url: "{stub}"}}
  ab: {{challenger_share: 0.0}}
  shadow: {{fraction: 0.0}}
"""
KEYS_ENV = "STILLHOUSE_API_KEYS"


@dataclass
class Target:
    name: str
    url: str  # the full /v1/chat/completions URL
    model: str
    notes: list[str] = field(default_factory=list)


@dataclass
class Row:
    name: str
    loads: dict[int, wrk.Load] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    na: str = ""  # why there are no numbers


def _post(url: str, body: dict[str, object]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _check_answer(target: Target, body: dict[str, object]) -> None:
    """One request before the load: a target that errors would otherwise be timed on its error
    path."""
    status, headers, raw = _post(target.url, body)
    if status != 200:
        raise StartError(f"POST answered {status}: {raw[:160].decode(errors='replace')}")
    try:
        choices = json.loads(raw)["choices"]
    except (ValueError, KeyError) as e:
        raise StartError(f"POST answered 200 without choices: {raw[:120]!r}") from e
    if not choices:
        raise StartError("POST answered 200 with no choices")
    lower = {k.lower(): v for k, v in headers.items()}
    if lower.get("x-stillhouse-fallback", "none") != "none":
        target.notes.append(
            f"served by {lower.get('x-stillhouse-served-by')}, fallback "
            f"{lower['x-stillhouse-fallback']} (the bench expects the student to answer)"
        )


def measure(target: Target, wrk_bin: str, tmp: Path, duration_s: float, log) -> Row:
    body = {"model": target.model, "messages": PROMPT, "max_tokens": 16}
    row = Row(target.name, notes=target.notes)
    _check_answer(target, body)
    script = wrk.write_script(
        tmp / (re.sub(r"\W+", "_", target.name) + ".lua"),
        body,
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    wrk.run(wrk_bin, target.url, script, max(CLIENTS), WARMUP_S)
    for clients in CLIENTS:
        log(f"  {target.name}: {clients} client(s), {duration_s:g} s")
        load = wrk.run(wrk_bin, target.url, script, clients, duration_s)
        if load.error_share > 0.01:
            row.notes.append(
                f"{clients} client(s): {load.non_2xx} non-2xx, {load.socket_errors} socket "
                f"errors in {load.requests} requests"
            )
        row.loads[clients] = load
    return row


# --- targets: each starts its server, yields the target, and stops the server ----------------


@contextmanager
def thin_target(stub_url: str, tmp: Path) -> Iterator[Target]:
    port = free_port()
    script = Path(__file__).resolve().parent / "gateway_bench_support" / "thin_proxy.py"
    upstream = stub_url.removesuffix("/v1")
    argv = [sys.executable, str(script), "--port", str(port), "--upstream", upstream]
    with Server("thin pass-through", argv, tmp / "thin.log") as server:
        server.wait_ready(f"http://127.0.0.1:{port}/v1/models", 30)
        loop = "uvloop" if "uvloop" in server.log_path.read_text() else "asyncio"
        yield Target(f"thin ({loop})", f"http://127.0.0.1:{port}/v1/chat/completions", "stub")


@contextmanager
def litellm(stub_url: str, tmp: Path, log) -> Iterator[Target]:
    script, install_s = litellm_target.ensure_venv(LITELLM_VENV, log)
    if install_s is not None:
        log(f"LiteLLM virtualenv installed in {install_s:.0f} s")
    version = litellm_target.version(LITELLM_VENV)
    server, base = litellm_target.server(script, stub_url, KEY, tmp / "litellm")
    with server:
        took = server.wait_ready(base + "/health/liveliness", 180)
        log(f"LiteLLM {version} ready in {took:.0f} s")
        yield Target(f"LiteLLM {version}", base + "/v1/chat/completions", litellm_target.MODEL)


@contextmanager
def ours(stub_url: str, tmp: Path, log) -> Iterator[Target]:
    command = Path(sys.executable).parent / "stillhouse"
    if not command.exists():
        raise StartError(f"no {command}")
    port = free_port()
    state = tmp / "ours-state"
    config = tmp / "ours.yaml"
    config.write_text(OURS_CONFIG.format(state_dir=state, port=port, stub=stub_url))
    argv = [str(command), "--config", str(config), "serve"]
    # Only the bench's config counts: STILLHOUSE_* overrides from the caller's shell are dropped.
    server = Server(
        "stillhouse serve",
        argv,
        tmp / "ours.log",
        env={KEYS_ENV: KEY},
        cwd=tmp,
        drop_env_prefix="STILLHOUSE_",
    )
    with server:
        base = f"http://127.0.0.1:{port}"
        took = server.wait_ready(base + "/readyz", 60)
        log(f"stillhouse gateway ready in {took:.1f} s")
        target = Target("ours (stillhouse)", base + "/v1/chat/completions", "stillhouse")
        yield target
        target.notes.append(_gateway_counts(base + "/metrics"))


def _gateway_counts(url: str) -> str:
    """Who answered during the load, from the gateway's own /metrics: the bench means the
    champion (the stub) to answer every request, without fallbacks."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as e:
        return f"/metrics unreadable after the run: {e}"
    answered: Counter[str] = Counter()
    for labels, value in re.findall(
        r"^stillhouse_gateway_requests_total\{([^}]*)\} (\S+)$", text, re.M
    ):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        answered[f"{tags.get('served_by', '?')}/{tags.get('outcome', '?')}"] += float(value)
    fallbacks = sum(
        float(v)
        for v in re.findall(r"^stillhouse_gateway_fallbacks_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    )
    by = ", ".join(f"{k} {v:,.0f}" for k, v in answered.most_common() if v) or "none counted"
    return f"answered (its /metrics): {by}; fallbacks to the teacher {fallbacks:,.0f}"


def run_target(name: str, start: Starter, wrk_bin: str, tmp: Path, duration_s: float, log) -> Row:
    log(f"[bold]{escape(name)}[/]")
    try:
        with start() as target:
            return measure(target, wrk_bin, tmp, duration_s, log)
    except StartError as e:
        reason = str(e)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # wrk or a client failed
        reason = f"{type(e).__name__}: {e}"
    log(f"[yellow]{escape(name)}: n/a ({escape(reason)})[/]")
    return Row(name, na=reason)


def baseline(first: Row, last: Row) -> Row:
    """The stub measured before and after the gateways, per cell the lower latency of the two
    (other work on the machine only adds latency, so overheads err on the large side)."""
    if first.na or last.na:
        return last if first.na else first
    loads = {}
    for clients in CLIENTS:
        a, b = first.loads[clients], last.loads[clients]
        fast = a if a.rps >= b.rps else b
        loads[clients] = replace(
            fast, p50_ms=min(a.p50_ms, b.p50_ms), p99_ms=min(a.p99_ms, b.p99_ms)
        )
    note = "measured first and last; per cell the lower latency and the higher req/s"
    return Row(first.name, loads, [note])


# --- report -----------------------------------------------------------------------------------


def report(console: Console, rows: list[Row], duration_s: float) -> None:
    direct = rows[0].loads
    table = Table(title=f"Gateway in front of an nginx stub: wrk, {duration_s:g} s per cell")
    for column in ("target", "clients", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "req/s"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for row in rows:
        if row.na:
            table.add_row(row.name, "", "n/a", "n/a", "n/a", "n/a", "n/a", end_section=True)
            continue
        for i, clients in enumerate(CLIENTS):
            load, base = row.loads[clients], direct[clients]
            overhead = (
                ("", "")
                if row is rows[0]
                else (f"{load.p50_ms - base.p50_ms:.2f}", f"{load.p99_ms - base.p99_ms:.2f}")
            )
            table.add_row(
                row.name if i == 0 else "",
                str(clients),
                f"{load.p50_ms:.2f}",
                f"{load.p99_ms:.2f}",
                *overhead,
                f"{load.rps:,.0f}",
                end_section=i == len(CLIENTS) - 1,
            )
    console.print(table)
    console.print("+p50/+p99: overhead, the target's latency minus direct-to-stub's")
    for row in rows:
        for note in ([f"n/a: {row.na}"] if row.na else []) + row.notes:
            console.print(escape(f"  {row.name}: {note}"))

    by_kind = {
        kind: next((r for r in rows if r.name.startswith(kind)), None)
        for kind in ("thin", "LiteLLM", "ours")
    }
    thin, lite, mine = (by_kind[k] for k in ("thin", "LiteLLM", "ours"))

    def rps(row: Row | None) -> float | None:
        return row.loads[max(CLIENTS)].rps if row and not row.na else None

    ratios = Table(title=f"Throughput ratios at {max(CLIENTS)} clients")
    for column in ("ratio", "value", "goal"):
        ratios.add_column(column, justify="left" if column == "ratio" else "right")
    checks: list[str] = []
    for label, num, den, goal in (
        ("ours / thin", rps(mine), rps(thin), 0.5),
        ("ours / LiteLLM", rps(mine), rps(lite), 20.0),
        ("thin / LiteLLM", rps(thin), rps(lite), None),
    ):
        value = f"{num / den:.2f}x" if num and den else "n/a"
        ratios.add_row(label, value, f">= {goal:g}x" if goal else "")
        if goal is not None:
            met = "n/a" if value == "n/a" else ("met" if num / den >= goal else "NOT met")
            checks.append(f"{label} {value} (>= {goal:g}x: {met})")
    console.print(ratios)
    if mine and not mine.na:
        p50 = mine.loads[1].p50_ms - direct[1].p50_ms
        met = "met" if p50 < 1.0 else "NOT met"
    else:
        p50, met = None, "n/a"
    checks.append(
        f"p50 overhead at 1 client {'n/a' if p50 is None else f'{p50:.2f} ms'} (< 1 ms: {met})"
    )
    console.print("goals:\n" + "\n".join(f"  {c}" for c in checks))


def main() -> int:
    parser = argparse.ArgumentParser(description="Gateway overhead and throughput bench.")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--skip-litellm", action="store_true", help="leave LiteLLM out")
    args = parser.parse_args()
    console = Console(width=min(Console().width, 100))

    def log(message: str) -> None:
        console.print(message)

    nginx, wrk_bin = stub.find_nginx(), wrk.find_wrk()
    if not nginx or not wrk_bin:
        missing = " and ".join(n for n, p in (("nginx", nginx), ("wrk", wrk_bin)) if not p)
        console.print(
            f"bench_gateway needs {missing}: apt-get install -y nginx-light wrk (make bench does)"
        )
        return 1
    load1, load5, _ = os.getloadavg()
    console.print(
        f"note: wrk, the stub and each server share the machine's {os.cpu_count()} cores (they "
        f"cannot be pinned apart); load average before the run {load1:.2f} (1 min), "
        f"{load5:.2f} (5 min): other work on the machine shows up in p99 first",
    )
    with tempfile.TemporaryDirectory(prefix="stillhouse-bench-gateway-") as tmp_name:
        tmp = Path(tmp_name)
        stub_server, stub_url = stub.nginx_server(tmp / "nginx", nginx)
        with stub_server:
            try:
                stub_server.wait_ready(stub_url + "/models", 20)
            except StartError as e:
                console.print(escape(f"the nginx stub did not start: {e}"))
                return 1
            direct = Target("direct (nginx stub)", stub_url + "/chat/completions", "stub")
            targets: list[tuple[str, Starter | None]] = [
                ("direct", lambda: _given(direct)),
                ("thin pass-through", lambda: thin_target(stub_url, tmp)),
                ("LiteLLM", None if args.skip_litellm else lambda: litellm(stub_url, tmp, log)),
                ("ours (stillhouse)", lambda: ours(stub_url, tmp, log)),
                ("direct", lambda: _given(direct)),  # again: the baseline brackets the rest
            ]
            rows = [
                run_target(name, start, wrk_bin, tmp, args.duration, log)
                if start
                else Row(name, na="skipped (--skip-litellm)")
                for name, start in targets
            ]
    rows = [baseline(rows[0], rows[-1]), *rows[1:-1]]
    if rows[0].na:
        console.print(escape(f"direct-to-stub measurement failed: {rows[0].na}"))
        return 1
    report(console, rows, args.duration)
    return 0


@contextmanager
def _given(target: Target) -> Iterator[Target]:
    yield target


if __name__ == "__main__":
    sys.exit(main())
