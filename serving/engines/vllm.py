"""Start and stop vLLM OpenAI-compatible servers as subprocesses.

    engine = VllmEngine(EngineSpec(model_path=Path("model"), served_model_name="teacher"), settings)
    with engine:                    # start, wait for /v1/models, ..., then stop
        print(engine.base_url)      # http://127.0.0.1:PORT/v1

The server runs in its own process group, so stopping it (SIGTERM, then SIGKILL after the grace
period) takes its workers along; a failed start raises `EngineStartError` quoting the log tail.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import httpx
import psutil

from stillhouse.common.config import EngineSettings
from stillhouse.common.errors import EngineStartError, UsageError

if TYPE_CHECKING:  # leftovers.py imports this module
    from stillhouse.serving.engines.leftovers import EngineNotes

log = logging.getLogger("stillhouse.serve")

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
LOG_TAIL_LINES = 25
ADOPT_PROBE_S = 5.0  # a healthy orphan answers /v1/models in milliseconds
KILL_WAIT_S = 30.0  # a SIGKILLed vLLM worker freeing its KV cache on a loaded machine: seconds


@dataclass(frozen=True)
class EngineSpec:
    """One model to serve: where its weights are and the name clients ask for."""

    model_path: Path
    served_model_name: str
    port: int | None = None  # overrides the settings' port; None there too picks a free one
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def build_engine_command(
    spec: EngineSpec, settings: EngineSettings, port: int, python: str = sys.executable
) -> list[str]:
    """The server's argv: our typed settings first, passthrough arguments last (they win)."""
    flags = {
        "--model": str(spec.model_path),
        "--served-model-name": spec.served_model_name,
        "--host": settings.host,
        "--port": str(port),
        "--max-model-len": str(settings.max_model_len),
        "--max-logprobs": str(settings.max_logprobs),
        "--dtype": settings.dtype,
        "--uvicorn-log-level": "warning",
    }
    cmd = [python, "-m", VLLM_SERVER_MODULE]
    for flag, value in flags.items():
        cmd += [flag, value]
    if settings.enforce_eager:
        cmd.append("--enforce-eager")
    cmd.extend(settings.extra_args)
    cmd.extend(spec.extra_args)
    return cmd


# What a vLLM server needs of its parent's environment: the system's basics, the Python it
# runs, and the GPU, compiler, thread and model-cache settings of its libraries.
ENV_ALLOWED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TERM",
        "SHELL",
        "HOSTNAME",
        "LD_LIBRARY_PATH",
        "LD_PRELOAD",
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
        "CC",
        "CXX",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
    }
)
ENV_ALLOWED_PREFIXES = (
    "LC_",
    "VLLM_",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "TORCH",
    "PYTORCH_",
    "TRITON_",
    "OMP_",
    "MKL_",
    "KMP_",
    "XDG_",
    "PYTHON",
)


def allowed_env(base: Mapping[str, str], extra: Sequence[str] = ()) -> dict[str, str]:
    """The part of `base` an engine may see: the allow-list plus `extra` (names, or prefixes
    ending in `*`). A secret of the parent's (the gateway's API keys) is never passed on."""
    names = ENV_ALLOWED | {e for e in extra if not e.endswith("*")}
    prefixes = ENV_ALLOWED_PREFIXES + tuple(e[:-1] for e in extra if e.endswith("*"))
    return {k: v for k, v in base.items() if k in names or k.startswith(prefixes)}


def build_engine_env(settings: EngineSettings, base: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: the allow-listed part of the caller's, plus the CPU backend's
    settings and the API key."""
    env = allowed_env(base, settings.env_allow)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_space_gib))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", settings.cpu_omp_threads_bind)
    # vLLM must not try a model hub: this machine (and most clusters' pods) cannot reach one.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if settings.api_key is not None:
        env["VLLM_API_KEY"] = settings.key or ""
    return env


def engine_fingerprint(
    spec: EngineSpec, settings: EngineSettings, environ: Mapping[str, str]
) -> str:
    """What a server started for `spec` runs: its command line (the port only where one is
    configured) and environment, hashed (the environment holds its API key). A gateway
    re-adopts an orphaned server only when this matches (leftovers.py)."""
    port = spec.port or settings.port or 0
    argv = build_engine_command(spec, settings, port)
    env = build_engine_env(settings, environ)
    blob = json.dumps([argv, sorted(env.items())])
    return hashlib.sha256(blob.encode()).hexdigest()


class AdoptedProcess:
    """A server process this gateway did not start (it re-adopted an orphan), with the part of
    `subprocess.Popen` that `VllmEngine` uses. Not our child, so its exit status is unknown:
    -1 once it has gone."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._proc = psutil.Process(pid)

    def poll(self) -> int | None:
        try:
            running = self._proc.is_running() and self._proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            running = False
        return None if running else -1

    def wait(self, timeout: float | None = None) -> int:
        with contextlib.suppress(psutil.Error):
            try:
                self._proc.wait(timeout)
            except psutil.TimeoutExpired:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0) from None
        return -1


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


def validate_model_dir(path: Path) -> None:
    """Fail in milliseconds, not after vLLM's start-up, when the path cannot be a model."""
    if not path.exists():
        raise UsageError(f"model path does not exist: {path}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"not a model directory (no config.json): {path}")


class VllmEngine:
    """A vLLM server subprocess with a bounded start, a readiness wait and a clean stop."""

    def __init__(
        self,
        spec: EngineSpec,
        settings: EngineSettings,
        log_dir: Path,
        environ: Mapping[str, str] | None = None,
        notes: EngineNotes | None = None,
    ) -> None:
        self.spec = spec
        self.notes = notes  # where its process group is noted while it runs
        self.settings = settings
        self.port = spec.port or settings.port or free_port(settings.host)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"engine-{spec.served_model_name}-{self.port}.log"
        self._environ = dict(os.environ if environ is None else environ)
        self._proc: subprocess.Popen[bytes] | AdoptedProcess | None = None
        self.adopted = False  # the server is an orphan of a killed gateway, re-adopted

    @property
    def fingerprint(self) -> str:
        return engine_fingerprint(self.spec, self.settings, self._environ)

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def exited(self) -> bool:
        """True once the server process has ended (or was never started)."""
        return self._proc is None or self._proc.poll() is not None

    @property
    def returncode(self) -> int | None:
        """The exit status of a server process that ended by itself; None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def start(self, *, append_log: bool = False) -> None:
        """Start the server process (a restart appends to the log rather than losing it), or
        re-adopt the same server a killed gateway left running."""
        validate_model_dir(self.spec.model_path)
        if self.notes is not None and self._adopt(self.notes):
            return
        cmd = build_engine_command(self.spec, self.settings, self.port)
        env = build_engine_env(self.settings, self._environ)
        # stop() reaches every worker
        self._proc = start_group(cmd, self.log_path, env, append=append_log)
        if self.notes is not None:
            self.notes.add(self._proc.pid, self.fingerprint, self.port)

    def _adopt(self, notes: EngineNotes) -> bool:
        """Re-adopt an orphan with this server's fingerprint if it answers now; one that does
        not (still booting, or hung) is stopped, and a fresh server starts in its place."""
        orphan = notes.claim(self.fingerprint)
        if orphan is None:
            return False
        url = f"http://{self.settings.host}:{orphan.port}/v1/models"
        try:
            answered = httpx.get(url, timeout=ADOPT_PROBE_S, headers=self.settings.auth_headers())
            healthy = answered.status_code == 200
        except httpx.HTTPError:
            healthy = False
        if not healthy:
            log.warning("the orphaned vLLM server on port %d does not answer: stopped", orphan.port)
            stop_group_id(orphan.pgid, self.settings.stop_grace_s)
            notes.remove(orphan.pgid)
            return False
        self.port = orphan.port
        self.log_path = self.log_path.with_name(
            f"engine-{self.spec.served_model_name}-{self.port}.log"
        )
        self._proc, self.adopted = AdoptedProcess(orphan.pgid), True
        return True

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Poll `/v1/models` until it answers 200; raise with the log tail if the server dies
        or the deadline passes (and stop it, so nothing is left behind)."""
        timeout_s = self.settings.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, headers=self.settings.auth_headers()) as client:
            while True:
                proc = self._proc  # stop() from another thread may clear it at any moment
                code = proc.poll() if proc is not None else -1
                if code is not None:
                    self.stop()
                    raise EngineStartError(
                        f"vLLM server for {self.spec.model_path} exited with code {code} "
                        f"before it was ready; last lines of {self.log_path}:\n"
                        f"{read_log_tail(self.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/models").status_code == 200:
                        return
                if time.monotonic() >= deadline:
                    self.stop()
                    raise EngineStartError(
                        f"vLLM server for {self.spec.model_path} was not ready within "
                        f"{timeout_s:.0f} s; last lines of {self.log_path}:\n"
                        f"{read_log_tail(self.log_path)}"
                    )
                time.sleep(0.5)

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM to the whole process group, SIGKILL after the grace period. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        grace_s = self.settings.stop_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace_s
        _signal_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
        # vLLM's engine-core worker may outlive the API server by a moment: give the group the
        # rest of the grace period, then SIGKILL whatever is left and wait until it is gone.
        if not _wait_group_gone(proc.pid, deadline):
            _signal_group(proc.pid, signal.SIGKILL)
            _wait_group_gone(proc.pid, time.monotonic() + KILL_WAIT_S)
        proc.wait()
        if self.notes is not None:
            self.notes.remove(proc.pid)

    def __enter__(self) -> VllmEngine:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def start_group(
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str],
    *,
    append: bool = False,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """`argv` as the leader of its own process group (so `stop_group` reaches every child it
    starts), its stdout and stderr into `log_path`, no stdin; `pass_fds` stay open in it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab" if append else "wb") as log:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the process group led by `proc` (it shuts down in its own order), SIGKILL to
    whatever of the group is left after `grace_s`, then reap `proc`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    if group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def group_alive(pgid: int) -> bool:
    """True while any process of the group is still running (zombies do not count)."""
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
    return False


def stop_group_id(pgid: int, grace_s: float) -> None:
    """SIGTERM to the process group `pgid`, SIGKILL to what is left after `grace_s`, and wait
    until it is gone (a group whose leader is not our child: an orphan, say)."""
    _signal_group(pgid, signal.SIGTERM)
    if not _wait_group_gone(pgid, time.monotonic() + grace_s):
        _signal_group(pgid, signal.SIGKILL)
        _wait_group_gone(pgid, time.monotonic() + KILL_WAIT_S)


def _wait_group_gone(pgid: int, deadline: float) -> bool:
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True
