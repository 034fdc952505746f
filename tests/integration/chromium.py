"""A small headless-Chromium driver for tests: open a page, collect every console error, uncaught
exception and failed load, and evaluate a check in the page. Speaks the Chrome DevTools Protocol
over a websocket (aiohttp); no Selenium, no Playwright, no driver binary.

    with Chromium() as browser:                       # raises ChromiumMissing if not installed
        page = browser.open(Path("report.html"), check_js="document.title")
        assert page.errors == [], page.errors
        print(page.value)

The browser runs in a process group of its own (`browser.pgid`); `stop()` kills the whole group,
so renderer and GPU/zygote helpers go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import psutil

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless=new",
    "--remote-debugging-port=0",  # the browser picks a free port and writes DevToolsActivePort
    "--no-sandbox",  # root in a container: the setuid/namespace sandbox is unavailable
    "--disable-gpu",
    "--disable-dev-shm-usage",  # small /dev/shm in containers crashes renderers
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",  # no update checks, no safe-browsing fetches
    "--disable-component-update",
    "--disable-sync",
    "--metrics-recording-only",
    "--mute-audio",
)


class ChromiumMissing(RuntimeError):
    pass


class ChromiumError(RuntimeError):
    pass


def live_in_group(pgid: int) -> list[psutil.Process]:
    """Processes of the group that still run (zombies only wait for their parent to reap)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def find_chromium() -> str | None:
    explicit = os.environ.get("STILLHOUSE_CHROMIUM")
    if explicit:
        return explicit
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageResult:
    """What a page did: `errors` holds one line per console error, uncaught exception or failed
    load (empty for a clean page); `value` is the check expression's result, as JSON data."""

    url: str
    errors: list[str] = field(default_factory=list)
    value: Any = None


class _Cdp:
    """One DevTools websocket: commands wait for their reply; events are kept in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.event_seen = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self.pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self.events.append(data)
                self.event_seen.set()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ChromiumError("DevTools connection closed"))

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        msg_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = future
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        await self.ws.send_str(json.dumps(message))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise ChromiumError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def wait_for(self, method: str, session: str, timeout: float) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise ChromiumError(f"no {method} within {timeout:.0f} s")
            self.event_seen.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event_seen.wait(), left)

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader


def _remote_text(obj: dict[str, Any]) -> str:
    if "value" in obj:
        return str(obj["value"])
    return str(obj.get("description") or obj.get("unserializableValue") or obj.get("type"))


def page_errors(events: list[dict[str, Any]], session: str) -> list[str]:
    """Console errors, uncaught exceptions and error log entries (failed loads, CSP violations)."""
    errors = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(_remote_text(a) for a in params.get("args", []))
            errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            errors.append(f"uncaught exception: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            where = f" ({entry['url']})" if entry.get("url") else ""
            errors.append(f"{entry.get('source', 'log')} error: {entry.get('text')}{where}")
    return errors


class Chromium:
    """A headless Chromium for one test (or one module): start, open pages, stop."""

    def __init__(self, binary: str | None = None, start_timeout_s: float = 60.0) -> None:
        self.binary = binary or find_chromium()
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws_url: str | None = None
        self.version: str | None = None
        self._profile: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        if not self.binary:
            raise ChromiumMissing(
                "chromium is not installed: run `make test` (it installs Debian's chromium "
                "package), or `apt-get install chromium`, or set STILLHOUSE_CHROMIUM"
            )
        self._profile = tempfile.TemporaryDirectory(prefix="stillhouse-chromium-")
        profile = Path(self._profile.name)
        log = (profile / "chromium.log").open("wb")
        self.proc = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={profile / 'data'}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() can kill every helper
        )
        log.close()
        port_file = profile / "data" / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                lines = port_file.read_text().split("\n") if port_file.exists() else []
                if len(lines) >= 2 and lines[0].strip().isdigit() and lines[1].strip():
                    self.ws_url = f"ws://127.0.0.1:{lines[0].strip()}{lines[1].strip()}"
                    break
                if self.proc.poll() is not None:
                    raise ChromiumError(f"chromium exited ({self.proc.returncode}):{self._log()}")
                if time.monotonic() > deadline:
                    raise ChromiumError(
                        f"chromium wrote no DevToolsActivePort in {self.start_timeout_s:.0f} s:"
                        f"{self._log()}"
                    )
                time.sleep(0.05)
            self.version = asyncio.run(self._browser_version())
        except BaseException:
            self.stop()
            raise

    def _log(self, lines: int = 20) -> str:
        if not self._profile:
            return ""
        path = Path(self._profile.name) / "chromium.log"
        tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
        return "".join(f"\n  {line}" for line in tail)

    async def _browser_version(self) -> str:
        async with aiohttp.ClientSession() as http, http.ws_connect(self.ws_url) as ws:
            cdp = _Cdp(ws)
            try:
                return str((await cdp.send("Browser.getVersion"))["product"])
            finally:
                await cdp.close()

    def open(
        self,
        target: Path | str,
        check_js: str | None = None,
        load_timeout_s: float = 30.0,
        settle_s: float = 0.3,
    ) -> PageResult:
        """Open a file (Path) or URL (str) in a fresh tab, wait for its load event plus
        `settle_s` for late errors, evaluate `check_js` (an expression; its value comes back as
        JSON data, promises awaited), close the tab."""
        if self.ws_url is None:
            raise ChromiumError("chromium is not started")
        url = target.resolve().as_uri() if isinstance(target, Path) else target
        return asyncio.run(self._open(url, check_js, load_timeout_s, settle_s))

    async def _open(
        self, url: str, check_js: str | None, load_timeout_s: float, settle_s: float
    ) -> PageResult:
        assert self.ws_url is not None
        timeout = aiohttp.ClientTimeout(total=load_timeout_s + 60)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.ws_connect(self.ws_url, max_msg_size=0) as ws,
        ):
            cdp = _Cdp(ws)
            try:
                target_id = (await cdp.send("Target.createTarget", {"url": "about:blank"}))[
                    "targetId"
                ]
                session = (
                    await cdp.send(
                        "Target.attachToTarget", {"targetId": target_id, "flatten": True}
                    )
                )["sessionId"]
                for domain in ("Runtime", "Log", "Page"):
                    await cdp.send(f"{domain}.enable", session=session)
                # Events from here on belong to the page under test, not to about:blank.
                cdp.events.clear()
                result = PageResult(url)
                nav = await cdp.send("Page.navigate", {"url": url}, session=session)
                if nav.get("errorText"):
                    result.errors.append(f"navigation failed: {nav['errorText']}")
                else:
                    await cdp.wait_for("Page.loadEventFired", session, load_timeout_s)
                    await asyncio.sleep(settle_s)
                    if check_js is not None:
                        result.value = await self._evaluate(cdp, session, check_js)
                result.errors += page_errors(cdp.events, session)
                await cdp.send("Target.closeTarget", {"targetId": target_id})
                return result
            finally:
                await cdp.close()

    async def _evaluate(self, cdp: _Cdp, session: str, expression: str) -> Any:
        reply = await cdp.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=session,
        )
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise ChromiumError(f"check expression failed: {text}")
        return reply.get("result", {}).get("value")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace_s`; idempotent."""
        if self.proc is not None:
            pgid = self.proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
            # Helpers may outlive the main process for a moment: the group goes, whatever is in it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
            deadline = time.monotonic() + grace_s
            while live_in_group(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None
        self.ws_url = None

    def __enter__(self) -> Chromium:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
