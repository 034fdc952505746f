"""The engine supervisor over fake servers: a server whose process ended is restarted with
back-off on the same port, its role's breaker is reset once it is ready, and after its tries
it is reported failed; what /admin/engines and the metrics say at each point."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from stillhouse.common.config import EngineSettings, GatewaySettings
from stillhouse.common.errors import EngineStartError
from stillhouse.common.roles import Role
from stillhouse.serving.engines.pool import EnginePool, pool_key
from stillhouse.serving.engines.supervisor import EngineSupervisor, backoff_s
from stillhouse.serving.engines.vllm import EngineSpec
from stillhouse.serving.gateway.metrics import GatewayMetrics
from stillhouse.serving.gateway.router import AbState, Router
from stillhouse.serving.gateway.upstream import new_engine


@dataclass
class FakeServer:
    spec: EngineSpec
    log_path: Path = Path("/dev/null")
    code: int | None = None
    fail_starts: int = 0
    calls: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return "http://127.0.0.1:9999/v1"

    @property
    def pid(self) -> int | None:
        return 4242

    @property
    def returncode(self) -> int | None:
        return self.code

    def start(self, *, append_log: bool = False) -> None:
        self.calls.append(f"start append={append_log}")
        self.code = None

    def wait_ready(self, timeout_s: float | None = None) -> None:
        if self.fail_starts:
            self.fail_starts -= 1
            self.code = 1
            raise EngineStartError("vLLM server exited with code 1 before it was ready")

    def stop(self, grace_s: float | None = None) -> None:
        self.calls.append("stop")


class NullWriter:
    def submit(self, item):  # the router logs A/B changes; none happen here
        raise AssertionError("no A/B change expected")


def setup(**engine: object):
    settings = EngineSettings(restart_backoff_s=0.01, restart_backoff_max_s=0.02, **engine)
    pool = EnginePool(lambda spec: FakeServer(spec))
    key = pool_key("models:/m/3")
    pool.start(key, EngineSpec(Path("/m"), "champion"))
    entry = pool.attach(key)
    entry.engine.calls.clear()  # the first start, by the pool
    metrics = GatewayMetrics()
    champion = new_engine(Role.CHAMPION, entry.base_url, "champion", "m/3", GatewaySettings())
    router = Router({Role.CHAMPION: champion}, AbState(0.0, "s"), NullWriter(), metrics)  # type: ignore[arg-type]
    return EngineSupervisor(pool, router, metrics, settings), entry, champion, metrics


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def settle(supervisor: EngineSupervisor) -> None:
    supervisor.check()
    for _ in range(200):
        if not supervisor._restarts:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the restart did not end")


def test_a_dead_server_is_restarted_on_its_port_and_its_breaker_reset():
    supervisor, entry, champion, metrics = setup()
    for _ in range(3):
        champion.breaker.record_failure(champion.breaker.allow())
    assert champion.breaker.current_state() == "open"
    entry.engine.code = -9  # SIGKILL
    asyncio.run(settle(supervisor))
    status = supervisor.status(entry.key)
    assert (status.state, status.restarts, status.attempts, status.last_exit) == (
        "running",
        1,
        1,
        -9,
    )
    assert entry.engine.calls == ["stop", "start append=True"]  # the old group reaped first
    assert champion.breaker.current_state() == "closed"
    assert sample(metrics, "stillhouse_engine_restarts_total", engine="champion", outcome="ok") == 1
    assert sample(metrics, "stillhouse_engine_process_up", engine="champion") == 1


def test_a_server_that_will_not_come_back_is_reported_failed_after_its_tries():
    supervisor, entry, _, metrics = setup(restart_max_attempts=3)
    entry.engine.code = 1
    entry.engine.fail_starts = 10
    asyncio.run(settle(supervisor))
    status = supervisor.status(entry.key)
    assert (status.state, status.attempts) == ("failed", 3)
    assert "exited with code 1" in status.last_error
    assert (
        sample(metrics, "stillhouse_engine_restarts_total", engine="champion", outcome="failed")
        == 1
    )
    assert sample(metrics, "stillhouse_engine_process_up", engine="champion") == 0
    asyncio.run(settle(supervisor))  # failed stays failed: no restart loop
    assert entry.engine.calls.count("start append=True") == 3


def test_a_running_server_is_left_alone():
    supervisor, entry, _, _ = setup()
    asyncio.run(settle(supervisor))
    assert entry.engine.calls == [] and supervisor.status(entry.key).state == "running"


def test_the_back_off_doubles_up_to_its_cap():
    assert [backoff_s(n, 1.0, 5.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
