"""Servers under test as subprocesses: each in its own process group (so a server's workers
stop with it), output to a log file, readiness polled with a bounded timeout, and stopped with
SIGTERM then SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path


class StartError(RuntimeError):
    """A server did not come up; the message is one line, fit for a table's note."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, headers: Mapping[str, str] | None = None, timeout: float = 2.0) -> int:
    """The status of a GET, or 0 when nothing answers."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return 0


class Server:
    """One server process. `with Server(...) as s:` starts it and always stops it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        drop_env_prefix: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        inherited = {
            k: v
            for k, v in os.environ.items()
            if drop_env_prefix is None or not k.startswith(drop_env_prefix)
        }
        self.env = {**inherited, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,
                )
            except OSError as e:
                raise StartError(f"{self.name}: cannot run {self.argv[0]}: {e}") from e

    def wait_ready(
        self, url: str, timeout_s: float, headers: Mapping[str, str] | None = None
    ) -> float:
        """Poll `url` until it answers 200; returns the seconds it took."""
        assert self.proc is not None
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise StartError(
                    f"{self.name} exited (rc {self.proc.returncode}): {self.last_log_line()}"
                )
            if http_status(url, headers) == 200:
                return time.monotonic() - started
            time.sleep(0.2)
        raise StartError(
            f"{self.name} not ready after {timeout_s:.0f} s ({url}): {self.last_log_line()}"
        )

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        # The most telling line is usually the last that is not a traceback's frame.
        for line in reversed(lines):
            line = line.strip()
            if line and not line.startswith(("File ", "^", "~", "│", "╰", "╭")):
                return line[:160] + f"  (log: {self.log_path})"
        return f"empty log ({self.log_path})"

    def stop(self, grace_s: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # the group this process leads, nothing else
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # Stragglers in the group (workers whose leader already exited).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
