"""Hot swap against fake vLLM servers over HTTP: routing moves to a new engine while requests in
flight finish on the old one, drains, per-version thresholds, the watcher's decisions (a table),
and the watcher end to end with a fake registry and fake servers started through the pool."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from fake_vllm import Behaviour, LoopThread, engine_app
from gateway_harness import ADMIN_KEY, CLIENT_KEY, Harness, gateway_harness, settings_for

from stillhouse.common.calibration_tags import CALIBRATION_TAG_PREFIX as P
from stillhouse.common.errors import EngineStartError
from stillhouse.common.registry import RegistryError, VersionInfo
from stillhouse.common.roles import Role
from stillhouse.common.traffic import TrafficLogReader
from stillhouse.serving.engines.admin import install_watcher
from stillhouse.serving.engines.model_cache import models_root
from stillhouse.serving.engines.pool import EnginePool, pool_key
from stillhouse.serving.engines.vllm import EngineSpec
from stillhouse.serving.engines.watcher import ModelWatcher, WatchedRole, share_refusal
from stillhouse.serving.gateway.app import GATEWAY, build_app
from stillhouse.serving.gateway.parts import EngineEndpoint
from stillhouse.serving.gateway.upstream import Engine, new_engine

MSG = [{"role": "user", "content": "I was charged twice"}]
BODY = {"model": "stillhouse", "messages": MSG, "max_tokens": 4}
V1, V2, V3 = (f"models:/student/{n}" for n in (1, 2, 3))
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
FIT = {P + "threshold": "-0.3", P + "certified": "true", P + "signal": "mean_logprob",
       P + "hold_tokens": "4"}  # fmt: skip


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def on_loop(lt: LoopThread, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the gateway's loop thread (the gateway is single-threaded)."""

    async def call() -> Any:
        return fn()

    return lt.run(call())


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(result=fn()))
    thread.start()
    return thread, out


# --- the gateway: swap, drain, remove, thresholds ---------------------------------------------


def extra_engine(h: Harness, ref: str, behaviour: Behaviour, role: str = "champion") -> Engine:
    url = h.loop.serve(engine_app(behaviour, role))
    return new_engine(role, url + "/v1", role, ref, h.settings.gateway)


@pytest.mark.parametrize("stream", [False, True])
def test_after_a_swap_new_requests_go_anew_while_one_in_flight_ends_on_the_old(tmp_path, stream):
    with gateway_harness(tmp_path) as h:
        gw = h.gateway.router
        old = gw.engines["champion"]
        h.engines["champion"].delay_s = 1.0
        body = {**BODY, "stream": stream}
        slow, out = in_thread(lambda: h.post("/v1/chat/completions", body,
                                             headers={"x-request-id": "slow"}))  # fmt: skip
        wait_until(lambda: old.in_flight == 1)
        fresh = Behaviour()
        new = extra_engine(h, "ref-new", fresh)
        assert on_loop(h.loop, lambda: gw.swap_engine("champion", new)) is old
        fast = h.post("/v1/chat/completions", body, headers={"x-request-id": "fast"})
        assert fast.status_code == 200 and fast.headers["x-stillhouse-served-by"] == "champion"
        assert len(fresh.requests) == 1
        assert h.loop.run(gw.drain(old, 0.2)) is False  # the slow one still runs on it
        assert h.loop.run(gw.drain(old, 5.0)) is True
        slow.join(5)
        assert out["result"].status_code == 200
        assert stream or out["result"].json()["choices"][0]["message"]["content"]
        assert h.record("slow").student_model == "ref-champion"
        assert h.record("fast").student_model == "ref-new"
        assert old.in_flight == new.in_flight == 0


def test_in_flight_counts_return_to_zero_whatever_happened(tmp_path):
    with gateway_harness(tmp_path, fallback={"attempt_timeout_s": 0.5}) as h:
        champion = h.engines["champion"]
        for mode, logprob, stream in [("ok", -0.01, False), ("ok", -3.0, True),
                                      ("error500", -0.01, False), ("break_stream", -0.01, True),
                                      ("reject400", -0.01, False)]:  # fmt: skip
            champion.mode, champion.logprob = mode, logprob
            h.post("/v1/chat/completions", {**BODY, "max_tokens": 10, "stream": stream})
        champion.mode = "hang"  # and a client that gives up mid-request
        with pytest.raises(httpx.TimeoutException):
            httpx.post(h.url + "/v1/chat/completions", json=BODY, timeout=0.2,
                       headers={"authorization": f"Bearer {CLIENT_KEY}"})  # fmt: skip
        wait_until(lambda: all(e.in_flight == 0 for e in h.gateway.router.engines.values()), 10)


def test_removing_the_challenger_sends_everyone_to_the_champion_and_is_logged(tmp_path):
    roles = ("teacher", "champion", "challenger")
    with gateway_harness(tmp_path, roles, ab={"challenger_share": 1.0}) as h:
        gw = h.gateway.router
        assert h.post("/v1/chat/completions", BODY).headers["x-stillhouse-arm"] == "challenger"
        old = on_loop(h.loop, lambda: gw.remove_engine("challenger"))
        assert old is not None and old.role == "challenger"
        assert h.post("/v1/chat/completions", BODY).headers["x-stillhouse-arm"] == "champion"
        metrics = httpx.get(h.url + "/metrics", timeout=10).text
        assert "stillhouse_gateway_challenger_share 0.0" in metrics
        assert 'circuit_state{engine="challenger"}' not in metrics
        with pytest.raises(ValueError):
            gw.remove_engine("champion")
        assert on_loop(h.loop, lambda: gw.swap_engine("challenger", old)) is None
        assert h.post("/v1/chat/completions", BODY).headers["x-stillhouse-arm"] == "challenger"
        wait_until(lambda: len(_ab_changes(h, "engine-watcher")) == 2)
        gone, back = _ab_changes(h, "engine-watcher")
        assert (gone.share, gone.previous_share) == (0.0, 1.0)
        assert (back.share, back.previous_share) == (1.0, 0.0)


def _ab_changes(h: Harness, actor: str) -> list:
    with TrafficLogReader(h.settings.traffic_log_path) as reader:
        return [c for c in reader.ab_changes() if c.actor == actor]


@pytest.mark.parametrize("stream", [False, True])
def test_each_engine_falls_back_at_its_own_threshold(tmp_path, stream):
    with gateway_harness(tmp_path) as h:  # configured threshold -0.5
        h.engines["champion"].logprob = -0.4
        body = {**BODY, "stream": stream}
        assert h.post("/v1/chat/completions", body).headers["x-stillhouse-served-by"] == "champion"
        champion = h.gateway.router.engines["champion"]
        on_loop(h.loop, lambda: champion.set_threshold(-0.3, "calibrated for the test"))
        resp = h.post("/v1/chat/completions", body)
        assert resp.headers["x-stillhouse-served-by"] == "teacher"
        assert resp.headers["x-stillhouse-fallback"] == "low_confidence"


# --- the watcher against a fake registry and fake servers ------------------------------------


class FakeRegistry:
    def __init__(self, root: Path) -> None:
        self.aliases: dict[str, int] = {}
        self.tags: dict[int, dict[str, str]] = {}
        self.root = root
        self.fail = False

    def lookup(self, ref: str) -> VersionInfo | None:
        if self.fail:
            raise RegistryError("cannot reach MLflow at http://mlflow: connection refused")
        if "@" in ref:
            version = self.aliases.get(ref.rpartition("@")[2])
        else:
            version = int(ref.rpartition("/")[2])
        if version is None:
            return None
        tags = dict(self.tags.get(version, {}))
        return VersionInfo("student", version, (), datetime.now(UTC), None, "src", tags)

    def download(self, uri: str) -> Path:
        path = self.root / uri.rpartition("/")[2]
        path.mkdir(parents=True, exist_ok=True)
        return path


class FakeServer:
    """A fake vLLM server started through the pool: served on the test loop, from whichever
    thread the pool starts it on."""

    def __init__(self, spec: EngineSpec, lt: LoopThread, fail: bool, block: bool) -> None:
        self.spec, self.lt, self.fail, self.block = spec, lt, fail, block
        self.behaviour = Behaviour()
        self.log_path = Path(os.devnull)
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.stopped = threading.Event()

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def pid(self) -> int | None:
        return None

    @property
    def returncode(self) -> int | None:
        return None

    def start(self, *, append_log: bool = False) -> None:
        async def serve() -> web.AppRunner:
            app = engine_app(self.behaviour, self.spec.served_model_name)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            return runner

        if not self.fail:
            self.runner = self.lt.run(serve())
            self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def wait_ready(self, timeout_s: float | None = None) -> None:
        if self.block:
            self.stopped.wait(10)
        if self.fail or self.stopped.is_set():
            raise EngineStartError(f"vLLM server for {self.spec.model_path} exited with code 1")

    def stop(self, grace_s: float | None = None) -> None:
        if self.runner is not None and not self.stopped.is_set():
            self.lt.run(self.runner.cleanup())
        self.stopped.set()


class FakeServers:
    def __init__(self, lt: LoopThread) -> None:
        self.lt = lt
        self.started: list[FakeServer] = []
        self.fail: set[str] = set()  # versions whose servers die at start
        self.block = False  # servers that take until stopped to (not) become ready

    def __call__(self, spec: EngineSpec) -> FakeServer:
        server = FakeServer(spec, self.lt, spec.model_path.name in self.fail, self.block)
        self.started.append(server)
        return server

    def of(self, version: int) -> FakeServer:
        return next(s for s in self.started if s.spec.model_path.name == str(version))


@dataclass
class World:
    h: Harness
    registry: FakeRegistry
    servers: FakeServers
    pool: EnginePool
    watcher: ModelWatcher
    app_index: int

    def refresh(self, wait: bool = True) -> httpx.Response:
        return self.h.http.post(self.h.url + "/admin/engines/refresh", json={"wait": wait},
                                headers=ADMIN, timeout=30)  # fmt: skip

    def state(self) -> dict:
        resp = self.h.http.get(self.h.url + "/admin/engines", headers=ADMIN)
        assert resp.status_code == 200, resp.text
        return resp.json()["engines"]

    def metrics(self) -> str:
        return self.h.http.get(self.h.url + "/metrics").text


@contextmanager
def watched_gateway(tmp_path: Path, challenger: bool = False, **gateway: Any) -> Iterator[World]:
    """teacher (a plain fake), champion at v1 and maybe challenger at v2 (servers in the pool,
    following `@champion` / `@challenger` of a fake registry), the watcher polling on demand."""
    settings = settings_for(tmp_path / "state", watch_interval_s=0, **gateway)
    lt = LoopThread()
    registry = FakeRegistry(tmp_path / "cache")
    servers = FakeServers(lt)
    pool = EnginePool(servers)
    try:
        teacher = Behaviour()
        url = lt.serve(engine_app(teacher, "teacher"))
        endpoints = {"teacher": EngineEndpoint(url + "/v1", "teacher", "teacher-dir")}
        roles = []
        for role, version in (("champion", 1), ("challenger", 2)):
            if role == "challenger" and not challenger:
                roles.append(WatchedRole(role, f"models:/student@{role}", True, role))
                continue
            registry.aliases[role] = version
            uri = f"models:/student/{version}"
            key = pool_key(uri)
            entry = pool.start(key, EngineSpec(registry.download(uri), role))
            pool.attach(key)
            endpoints[role] = EngineEndpoint(entry.base_url, entry.served_name, uri)
            roles.append(WatchedRole(role, f"models:/student@{role}", True, role, (),
                                     uri, key, {}))  # fmt: skip
        env = {"STILLHOUSE_API_KEYS": CLIENT_KEY, "STILLHOUSE_ADMIN_KEY": ADMIN_KEY}
        app = build_app(settings, endpoints, env)
        gateway = app[GATEWAY]
        watcher = ModelWatcher(gateway.router, gateway.metrics, pool, registry, roles, settings)
        install_watcher(app, watcher)
        url = lt.serve(app)
        h = Harness(url, settings, {"teacher": teacher}, app[GATEWAY], lt)
        with h.http:
            yield World(h, registry, servers, pool, watcher, len(lt.runners) - 1)
        pool.close()
    finally:
        lt.close()


def test_the_champion_alias_moves_new_requests_go_to_the_new_version_the_old_drains(tmp_path):
    with watched_gateway(tmp_path) as w:
        gw = w.h.gateway.router
        old = w.servers.of(1)
        old.behaviour.delay_s = 1.0
        slow, out = in_thread(lambda: w.h.post("/v1/chat/completions", BODY,
                                               headers={"x-request-id": "slow"}))  # fmt: skip
        wait_until(lambda: gw.engines["champion"].in_flight == 1)
        w.registry.aliases["champion"] = 3
        assert w.refresh(wait=False).status_code == 202
        wait_until(lambda: gw.engines["champion"].ref == V3)
        fast = w.h.post("/v1/chat/completions", BODY, headers={"x-request-id": "fast"})
        assert fast.status_code == 200
        assert not old.stopped.is_set()  # still draining the slow request
        slow.join(5)
        assert out["result"].status_code == 200
        assert w.h.record("slow").student_model == V1
        assert w.h.record("fast").student_model == V3
        wait_until(old.stopped.is_set)
        wait_until(lambda: w.state()["champion"]["swapping"] is None)
        champion = w.state()["champion"]
        assert champion["model"] == V3 and champion["follows"] == "models:/student@champion"
        assert champion["last_swap"]["from"] == V1 and champion["last_swap"]["outcome"] == "ok"
        assert champion["last_swap"]["seconds"] >= 0.5
        assert 'stillhouse_engine_swaps_total{outcome="ok",role="champion"} 1.0' in w.metrics()
        assert w.pool.keys() == {(V3, ())}


def test_after_a_swap_the_model_cache_keeps_the_newest_and_the_served_versions(tmp_path):
    with watched_gateway(tmp_path, model_cache_keep=1) as w:
        root = models_root(w.h.settings) / "student"
        for name in ("1", "2", "4", ".download-5"):
            (root / name).mkdir(parents=True)
        w.registry.aliases["champion"] = 2  # an older version than the newest cached (4)
        w.refresh()
        assert w.h.gateway.router.engines["champion"].ref == V2
        assert sorted(p.name for p in root.iterdir()) == [".download-5", "2", "4"]


def test_promoting_the_challenger_reuses_its_server_and_stops_only_the_old_champion(tmp_path):
    with watched_gateway(tmp_path, challenger=True, ab={"challenger_share": 0.5}) as w:
        gw = w.h.gateway.router
        challenger_url = gw.engines["challenger"].base_url
        w.registry.aliases["champion"] = 2
        del w.registry.aliases["challenger"]
        assert w.refresh().status_code == 200
        assert len(w.servers.started) == 2  # nothing new started
        assert gw.engines["champion"].ref == V2
        assert gw.engines["champion"].base_url == challenger_url
        assert gw.engines["champion"].served_name == "challenger"  # the server's own name
        assert "challenger" not in gw.engines
        assert w.servers.of(1).stopped.is_set() and not w.servers.of(2).stopped.is_set()
        assert w.pool.get((V2, ())).users == 1
        resp = w.h.post("/v1/chat/completions", BODY, headers={"x-request-id": "after"})
        assert resp.headers["x-stillhouse-arm"] == "champion"
        assert w.h.record("after").student_model == V2
        metrics = w.metrics()
        assert 'stillhouse_engine_swaps_total{outcome="ok",role="champion"} 1.0' in metrics
        assert 'stillhouse_engine_swaps_total{outcome="removed",role="challenger"} 1.0' in metrics
        state = w.state()
        assert state["challenger"]["active"] is False
        assert state["challenger"]["last_swap"]["outcome"] == "removed"


def champion_moves(w: World) -> list[str]:
    return [a.kind for a in w.h.loop.run(w.watcher.cycle()) if a.role == "champion"]


def test_a_failed_start_keeps_the_old_version_and_retries_after_a_back_off(tmp_path):
    with watched_gateway(tmp_path) as w:
        gw = w.h.gateway.router
        before = gw.engines["champion"]
        w.servers.fail.add("3")
        w.registry.aliases["champion"] = 3
        assert champion_moves(w) == ["start"]
        assert gw.engines["champion"] is before
        assert w.h.post("/v1/chat/completions", BODY).status_code == 200
        state = w.state()["champion"]
        assert "starting models:/student/3 failed" in state["last_error"]
        assert 0 < state["retry_in_s"] <= 30 and state["swapping"] is None
        assert 'engine_swaps_total{outcome="start_failed",role="champion"} 1.0' in w.metrics()
        assert champion_moves(w) == ["wait"]
        w.servers.fail.clear()
        w.watcher.roles["champion"].retry = (V3, 0.0)  # the back-off has passed
        assert champion_moves(w) == ["start"]
        assert gw.engines["champion"].ref == V3
        assert w.state()["champion"]["last_error"] is None


def test_new_calibration_tags_change_the_threshold_in_place(tmp_path):
    with watched_gateway(tmp_path) as w:
        gw = w.h.gateway.router
        engine = gw.engines["champion"]
        w.servers.of(1).behaviour.logprob = -0.4  # above the configured -0.5
        served = w.h.post("/v1/chat/completions", BODY).headers["x-stillhouse-served-by"]
        assert served == "champion"
        assert engine.policy.calibrated is None
        assert "no calibrated threshold" in engine.threshold_source
        w.registry.tags[1] = FIT
        assert w.refresh().status_code == 200
        assert gw.engines["champion"] is engine and engine.policy.calibrated == -0.3
        state = w.state()["champion"]
        assert state["threshold"] == -0.3 and state["threshold_source"] == f"calibrated for {V1}"
        resp = w.h.post("/v1/chat/completions", BODY)
        assert resp.headers["x-stillhouse-fallback"] == "low_confidence"
        w.registry.tags[1] = {**FIT, P + "hold_tokens": "16"}  # fit for another hold length
        w.refresh()
        assert engine.policy.calibrated is None and "16 tokens" in engine.threshold_source
        assert w.state()["champion"]["threshold"] == -0.5


def test_a_challenger_alias_that_appears_is_served_at_the_configured_share(tmp_path):
    with watched_gateway(tmp_path, ab={"challenger_share": 1.0}) as w:
        gw = w.h.gateway.router
        assert w.state()["challenger"] == {**w.state()["challenger"], "active": False}
        assert w.h.post("/v1/chat/completions", BODY).headers["x-stillhouse-arm"] == "champion"
        w.registry.aliases["challenger"] = 2
        w.registry.tags[2] = FIT
        w.refresh()
        challenger = gw.engines["challenger"]
        assert challenger.ref == V2 and challenger.policy.calibrated == -0.3
        resp = w.h.post("/v1/chat/completions", BODY, headers={"x-request-id": "c"})
        assert resp.headers["x-stillhouse-arm"] == "challenger"
        assert w.h.record("c").student_model == V2
        wait_until(lambda: len(_ab_changes(w.h, "engine-watcher")) == 1)
        (change,) = _ab_changes(w.h, "engine-watcher")
        assert (change.share, change.previous_share) == (1.0, 0.0)
        assert "stillhouse_gateway_challenger_share 1.0" in w.metrics()


def test_an_uncertified_challenger_is_started_but_serves_no_user_until_certified(tmp_path):
    with watched_gateway(tmp_path, ab={"challenger_share": 1.0}) as w:
        gw = w.h.gateway.router
        w.registry.aliases["challenger"] = 2
        w.registry.tags[2] = {P + "certified": "false", **{k: v for k, v in FIT.items()
                                                            if k != P + "certified"}}  # fmt: skip
        w.refresh()
        assert gw.has_challenger and gw.share_in_force == 0.0  # started: the mirror can use it
        arms = {
            w.h.post("/v1/chat/completions", BODY, headers={"x-request-id": f"u{i}"}).headers[
                "x-stillhouse-arm"
            ]
            for i in range(40)
        }
        assert arms == {"champion"}
        ab = w.h.http.get(w.h.url + "/admin/ab", headers=ADMIN).json()
        assert (ab["challenger_share"], ab["share_in_force"]) == (1.0, 0.0)
        assert "not certified" in ab["share_refused"] and "serve_uncertified" in ab["share_refused"]
        assert "stillhouse_gateway_challenger_share 0.0" in w.metrics()
        assert _ab_changes(w.h, "engine-watcher") == []  # its share in force never left 0

        w.registry.tags[2] = FIT  # calibration certified it
        w.refresh()
        resp = w.h.post("/v1/chat/completions", BODY, headers={"x-request-id": "c"})
        assert resp.headers["x-stillhouse-arm"] == "challenger"
        wait_until(lambda: len(_ab_changes(w.h, "engine-watcher")) == 1)
        (change,) = _ab_changes(w.h, "engine-watcher")
        assert (change.share, change.previous_share) == (1.0, 0.0)


def test_an_operator_may_force_an_uncalibrated_challenger_to_serve(tmp_path):
    ab = {"challenger_share": 1.0, "serve_uncertified": True}
    with watched_gateway(tmp_path, ab=ab) as w:
        w.registry.aliases["challenger"] = 2  # no calibration tags at all
        w.refresh()
        resp = w.h.post("/v1/chat/completions", BODY, headers={"x-request-id": "c"})
        assert resp.headers["x-stillhouse-arm"] == "challenger"


SHARE_RULE = [
    ("a_certified_challenger", "challenger", FIT, {}, None),
    ("an_uncalibrated_challenger", "challenger", {}, {}, "no calibrated threshold"),
    ("a_challenger_fit_for_another_window", "challenger", {**FIT, P + "hold_tokens": "16"}, {},
     "16 tokens"),
    ("the_override", "challenger", {}, {"serve_uncertified": True}, None),
    ("no_registry_version", "challenger", None, {}, None),
    ("the_champion", "champion", {}, {}, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "role", "tags", "ab", "refused"), SHARE_RULE, ids=[c[0] for c in SHARE_RULE]
)
def test_only_a_challenger_version_without_a_certified_threshold_is_refused_users(
    tmp_path, case, role, tags, ab, refused
):
    settings = settings_for(tmp_path, ab=ab) if ab else settings_for(tmp_path)
    why = share_refusal(Role(role), tags, settings)
    assert (why is None) == (refused is None)
    if refused is not None:
        assert why is not None and refused in why


def test_an_unreachable_registry_changes_nothing_and_is_reported(tmp_path):
    with watched_gateway(tmp_path) as w:
        w.registry.fail = True
        assert w.h.loop.run(w.watcher.cycle()) == []
        resp = w.h.http.get(w.h.url + "/admin/engines", headers=ADMIN).json()
        assert "connection refused" in resp["last_poll"]["error"]
        assert resp["engines"]["champion"]["model"] == V1


def test_the_engines_admin_api_needs_the_admin_key_and_checks_its_input(tmp_path):
    with watched_gateway(tmp_path) as w:
        client = {"authorization": f"Bearer {CLIENT_KEY}"}
        assert w.h.http.get(w.h.url + "/admin/engines", headers=client).status_code == 401
        bad = w.h.http.post(w.h.url + "/admin/engines/refresh", json={"wait": "yes"},
                            headers=ADMIN)  # fmt: skip
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "wait"
        assert w.h.post("/admin/engines/refresh", {"now": 1}, key=ADMIN_KEY).status_code == 400
        teacher = w.state()["teacher"]
        assert teacher["active"] and "threshold" not in teacher and "follows" not in teacher


def test_stopping_the_gateway_stops_a_server_that_is_still_starting(tmp_path):
    with watched_gateway(tmp_path) as w:
        w.servers.block = True
        w.registry.aliases["champion"] = 3
        w.refresh(wait=False)
        wait_until(lambda: len(w.servers.started) == 2)
        started = time.monotonic()
        w.h.loop.stop_runner(w.app_index)  # the app's shutdown stops the watcher
        assert time.monotonic() - started < 5
        assert w.servers.of(3).stopped.is_set()
        assert w.h.gateway.router.engines["champion"].ref == V1
