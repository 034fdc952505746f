"""Shared fixtures. The expensive ones (a built demo world, a running vLLM server) are built once
per test session; the demo world is also cached on disk between runs by its input hash."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stillhouse.common.config import DemoSettings, EngineSettings, Settings

REPO = Path(__file__).resolve().parents[1]

# `start_gateway` (a real `stillhouse serve` process), for the integration and fault tests.
pytest_plugins = ("serve_process",)

# A small, fast-to-build variant of the demo world: same code path, minutes become seconds.
TINY_DEMO = DemoSettings(
    n_train=600,
    n_val=36,
    n_test=90,
    vocab_size=700,
    judge_share=0.3,
    # A little pairwise judging: on 600 tickets a one-layer model that mostly compares answers
    # stops answering tickets in the triage format.
    pairwise_share=0.1,
    teacher_epochs=8.0,
    teacher_hidden_size=64,
    teacher_layers=1,
)
TEST_ENGINE = EngineSettings(
    max_model_len=256, enforce_eager=True, ready_timeout_s=420, stop_grace_s=10
)


def processes_in_group(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


@pytest.fixture(scope="session")
def group_processes():
    """`group_processes(pgid)`: the live processes of a process group (to assert it is empty)."""
    return processes_in_group


@pytest.fixture(scope="session")
def tiny_settings() -> Settings:
    return Settings(state_dir=REPO / ".stillhouse" / "test", demo=TINY_DEMO, engine=TEST_ENGINE)


@pytest.fixture(scope="session")
def tiny_world(tiny_settings: Settings):
    from stillhouse.demo.build import build_demo_world

    return build_demo_world(tiny_settings)


@contextlib.contextmanager
def running_vllm(model_dir: Path, name: str, settings: Settings) -> Iterator:
    """A vLLM CPU server on `model_dir` for the block; stopped after it, and the stop is
    checked: nothing of its process group may survive."""
    from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine

    engine = VllmEngine(EngineSpec(model_dir, name), settings.engine, settings.logs_dir)
    engine.start()
    pgid = engine.pid
    try:
        engine.wait_ready()
        yield engine
    finally:
        engine.stop()
    assert pgid is not None
    assert processes_in_group(pgid) == [], f"vLLM processes of {name!r} survived stop()"


@pytest.fixture(scope="session")
def vllm_server():
    """`with vllm_server(model_dir, name, settings) as engine:` (for module-scoped engines)."""
    return running_vllm


@pytest.fixture(scope="session")
def teacher_engine(tiny_world, tiny_settings: Settings) -> Iterator:
    """One vLLM CPU server on the tiny teacher for the whole session."""
    with running_vllm(tiny_world.teacher_dir, "teacher", tiny_settings) as engine:
        yield engine
