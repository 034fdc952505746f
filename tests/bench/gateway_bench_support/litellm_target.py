"""The LiteLLM proxy, in its own virtualenv (its pins must not touch the project's), fronting
the stub with one model, a master key and no database.

The virtualenv is made on first use under `.stillhouse/bench/litellm-venv` and reused; a
`.installed` marker is written only once `pip install 'litellm[proxy]'` succeeded.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .procs import Server, StartError, free_port

PACKAGE = "litellm[proxy]"
MODEL = "stub"
INSTALL_TIMEOUT_S = 900
# No internet here: LiteLLM would otherwise fetch its model price map from GitHub at start.
ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR",
}


def ensure_venv(venv: Path, log) -> tuple[Path, float | None]:
    """The venv's `litellm` script, and how long installing took (None: already installed).
    Raises StartError with one line when it cannot be installed (e.g. offline)."""
    marker = venv / ".installed"
    script = venv / "bin" / "litellm"
    if marker.exists() and script.exists():
        return script, None
    log(f"creating LiteLLM's own virtualenv in {venv} (first run only; about a minute or two)")
    started = time.monotonic()
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [
        [base, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", PACKAGE],
    ]
    for argv in steps:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise StartError(f"installing {PACKAGE} failed: {e}") from e
        if out.returncode != 0:
            lines = [
                line
                for line in out.stderr.strip().splitlines()
                if "is ignored: it is neither a file nor a directory" not in line
            ]
            reason = lines[-1] if lines else f"rc {out.returncode}"
            raise StartError(f"installing {PACKAGE} failed: {reason[:160]}")
    if not script.exists():
        raise StartError(f"installing {PACKAGE} left no {script}")
    marker.write_text(PACKAGE + "\n")
    return script, time.monotonic() - started


def version(venv: Path) -> str:
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip() or "?"


def server(script: Path, stub_base_url: str, master_key: str, work: Path) -> tuple[Server, str]:
    """A one-worker LiteLLM proxy and its base URL (no /v1)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = work / "litellm.yaml"
    config.write_text(
        f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {stub_base_url}
      api_key: sk-stub
general_settings:
  master_key: {master_key}
litellm_settings:
  telemetry: false
"""
    )
    argv = [
        str(script),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    return Server("LiteLLM", argv, work / "litellm.log", env=ENV, cwd=work), (
        f"http://127.0.0.1:{port}"
    )
