"""`stillhouse up`: the whole loop on one machine, until Ctrl-C.

    stillhouse up                     # gateway + engines, rollout controller, weekly re-distill
    stillhouse up --no-schedule       # without the re-distillation schedule
    stillhouse --config stillhouse.yaml up --port 8000 [--with-prometheus]

Its children are the commands a user could run alone (`serve`, `controller`, `schedule`, and
Prometheus), each in its own process group with its log under `<state_dir>/logs/`; they talk
only through the registry, the traffic log and the gateway's admin API. A child that dies is
restarted with a back-off (at most `MAX_RESTARTS` in `RESTART_WINDOW_S`, then `up` stops all);
Ctrl-C stops the controller and scheduler first, then the gateway. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console

from stillhouse.cli.context import CliState
from stillhouse.common.config import Settings
from stillhouse.common.errors import StillhouseError
from stillhouse.serving.engines.vllm import read_log_tail, start_group, stop_group
from stillhouse.serving.listener import LISTEN_FD_ENV, bind_listener

MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STOP_GRACE_S = 60.0  # the gateway drains and stops its engines inside this
READY_TIMEOUT_S = 1800.0  # cold vLLM starts on two cores, one per model


def register(app: typer.Typer) -> None:
    app.command()(up)


def up(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="Gateway port (default: config, 8000).")] = None,
    schedule: Annotated[
        bool, typer.Option(help="Also re-distil on the configured cron schedule.")
    ] = True,
    with_prometheus: Annotated[
        bool,
        typer.Option(help="Also run a local Prometheus with the shipped config and rules."),
    ] = False,
    prometheus_port: Annotated[
        int, typer.Option(help="Port of the local Prometheus.", min=1, max=65535)
    ] = 9090,
) -> None:
    """Engines, gateway, rollout controller and weekly re-distillation together; Ctrl-C stops."""
    state: CliState = ctx.obj
    run_up(
        state.settings(),
        state.config,
        Console(),
        port=port,
        with_schedule=schedule,
        prometheus_port=prometheus_port if with_prometheus else None,
    )


class UpError(StillhouseError):
    """A child of `stillhouse up` kept failing or never became ready."""


def restart_delay(exits: Sequence[float], now: float) -> float | None:
    """Seconds to wait before restarting a child that exited at the times `exits` (newest
    last), or None when it failed too often within the window and should stay down."""
    recent = [t for t in exits if now - t <= RESTART_WINDOW_S]
    if len(recent) > MAX_RESTARTS:
        return None
    return BACKOFF_S[min(len(recent), len(BACKOFF_S)) - 1] if recent else 0.0


@dataclass
class Child:
    name: str
    argv: list[str]
    env: Mapping[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    exits: list[float] = field(default_factory=list)
    restart_at: float | None = None
    pass_fds: tuple[int, ...] = ()  # the gateway's: the listening socket `up` keeps

    def start(self) -> None:
        self.proc = start_group(
            self.argv, self.log_path, self.env, append=True, pass_fds=self.pass_fds
        )

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace_s: float) -> None:
        """SIGTERM to its group (it shuts down in order), SIGKILL for what is left after."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_group(proc, grace_s)


def child_commands(config: Path | None, port: int, with_schedule: bool) -> dict[str, list[str]]:
    base = [sys.executable, "-m", "stillhouse"]
    if config is not None:
        base += ["--config", str(config)]
    commands = {
        "gateway": [*base, "serve", "--port", str(port)],
        "controller": [*base, "controller"],
    }
    if with_schedule:
        commands["schedule"] = [*base, "schedule"]
    return commands


def child_environment(
    settings: Settings, environ: Mapping[str, str], gateway_url: str
) -> tuple[dict[str, str], bool]:
    """The children's environment: the admin key they share (generated for this session when
    the user set none) and the gateway URL the controller calls. True when generated."""
    env = dict(environ)
    key_env = settings.gateway.admin_key_env
    generated = not env.get(key_env, "").strip()
    if generated:
        env[key_env] = secrets.token_urlsafe(24)
    env["STILLHOUSE_ROLLOUT__CONTROLLER__GATEWAY_URL"] = gateway_url
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env, generated


def _prometheus_command(settings: Settings, gateway: str, listen_port: int) -> list[str] | None:
    from stillhouse.cli.local_prometheus import prepare_local_prometheus

    cfg = settings.rollout.controller
    controller = f"{cfg.metrics_host}:{cfg.metrics_port}" if cfg.metrics_port else None
    return prepare_local_prometheus(
        settings.state_dir,
        gateway=gateway,
        controller=controller,
        listen=f"127.0.0.1:{listen_port}",
    )


def wait_ready(url: str, gateway: Child, timeout_s: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline and not stop.is_set():
            if gateway.poll() is not None:
                raise UpError(
                    f"the gateway exited while starting; last lines of {gateway.log_path}:\n"
                    f"{read_log_tail(gateway.log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/readyz").status_code == 200:
                    return
            stop.wait(1.0)
    if not stop.is_set():
        raise UpError(f"the gateway was not ready within {timeout_s:.0f} s; see {gateway.log_path}")


def supervise(
    children: Sequence[Child],
    stop: threading.Event,
    say: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
    tick_s: float = 0.5,
) -> None:
    """Restart children that exit until `stop` is set; raise UpError when one keeps failing."""
    while not stop.wait(tick_s):
        now = clock()
        for child in children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    say(f"{child.name}: restarting")
                    child.start()
                continue
            code = child.poll()
            if code is None:
                continue
            child.proc = None
            child.exits.append(now)
            delay = restart_delay(child.exits, now)
            if delay is None:
                raise UpError(
                    f"{child.name} exited {len(child.exits)} times within "
                    f"{RESTART_WINDOW_S:.0f} s (last code {code}); see {child.log_path}"
                )
            say(
                f"{child.name} exited with code {code}; restarting in {delay:.0f} s "
                f"(log {child.log_path})"
            )
            child.restart_at = now + delay


def run_up(
    settings: Settings,
    config: Path | None,
    console: Console,
    *,
    port: int | None = None,
    with_schedule: bool = True,
    prometheus_port: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """`prometheus_port`: also run a local Prometheus on it (when the binary is installed)."""
    gw = settings.gateway
    # `up` holds the gateway's port for its whole run: a restarted gateway inherits the socket,
    # so connections made while it restarts wait in the kernel's queue instead of failing.
    with bind_listener(gw.host, gw.port if port is None else port) as listener:
        port = listener.getsockname()[1]
        url = f"http://{gw.host}:{port}"
        env, generated = child_environment(
            settings, os.environ if environ is None else environ, url
        )
        logs = settings.logs_dir
        commands = child_commands(config, port, with_schedule)
        if prometheus_port is not None:
            prometheus = _prometheus_command(settings, f"{gw.host}:{port}", prometheus_port)
            if prometheus is None:
                console.print(
                    "prometheus: not installed (Debian's `prometheus` package; `make test` "
                    "installs it); going on without it",
                    markup=False,
                )
            else:
                commands["prometheus"] = prometheus
        children = {
            name: Child(name, argv, env, logs / f"up-{name}.log") for name, argv in commands.items()
        }
        gateway_env = {**env, LISTEN_FD_ENV: str(listener.fileno())}
        children["gateway"].env, children["gateway"].pass_fds = gateway_env, (listener.fileno(),)
        stop = threading.Event()
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}

        def say(line: str) -> None:
            console.print(line, markup=False, highlight=False)

        try:
            gateway = children["gateway"]
            say(f"gateway: starting engines and the gateway (log {gateway.log_path})")
            gateway.start()
            with console.status("waiting for the gateway (engines start in a minute or more each)"):
                wait_ready(url, gateway, READY_TIMEOUT_S, stop)
            if stop.is_set():
                return
            say(f"gateway ready at {url}/v1; metrics {url}/metrics")
            if "prometheus" in children:
                children["prometheus"].start()
                say(
                    f"prometheus: http://127.0.0.1:{prometheus_port}/targets (UI and targets; "
                    f"log {children['prometheus'].log_path})"
                )
            for name in ("controller", "schedule"):
                if name in children:
                    children[name].start()
                    say(f"{name}: started (log {children[name].log_path})")
            if generated:
                say(
                    f"admin API: a key was generated for this session; set ${gw.admin_key_env} "
                    "before `stillhouse up` to call /admin yourself"
                )
            say("Ctrl-C stops everything.")
            supervise(list(children.values()), stop, say)
        finally:
            for name in ("controller", "schedule", "gateway", "prometheus"):
                if name in children and children[name].proc is not None:
                    say(f"stopping {name}")
                    children[name].stop(STOP_GRACE_S)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
