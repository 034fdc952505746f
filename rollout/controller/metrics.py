"""The rollout controller's Prometheus endpoint: the rollout's state and the batch jobs' gauges.

    stillhouse controller     # also serves http://127.0.0.1:9401/metrics
                              # (rollout.controller.metrics_host / metrics_port; port 0: off)

Two collectors on one registry, both read at scrape time so nothing can go stale:
`RolloutCollector` (phase, step and version from the store; promotions and rollbacks counted
from the journal, so they survive restarts; the last gate look) and `JobFilesCollector` (the
`<state_dir>/metrics/*.prom` files of `stillhouse judge|ab|drift` and every re-distillation run,
which cannot be scraped while they run). Labels stay bounded: phase, gate; a version is a value.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from stillhouse.common.errors import UsageError
from stillhouse.common.rollout_settings import ControllerSettings
from stillhouse.rollout.controller.core import ControllerState, GateLook, Observation, Phase
from stillhouse.rollout.controller.store import ControllerStore
from stillhouse.rollout.gate_status import GATE_NAMES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecisionCounts:
    """Executed promotions and rollbacks in the journal, with the time of the last of each."""

    promotions: int = 0
    rollbacks: int = 0
    last_promotion_at: float | None = None
    last_rollback_at: float | None = None


def rollout_families(
    state: ControllerState,
    cfg: ControllerSettings,
    counts: DecisionCounts,
    gates: GateLook | None,
    last_tick_at: float | None,
) -> list[Metric]:
    """The rollout's metric families from plain data (pure; the collector does the reading)."""
    phase = GaugeMetricFamily(
        "stillhouse_rollout_phase",
        "The rollout controller's phase: 1 for the current one, 0 for the others.",
        labels=["phase"],
    )
    for p in Phase:
        phase.add_metric([p.value], 1.0 if state.phase is p else 0.0)
    ramp = state.phase is Phase.RAMP
    out: list[Metric] = [
        phase,
        GaugeMetricFamily(
            "stillhouse_rollout_step",
            "The ramp step under way, 1..n (0 outside the ramp).",
            value=float(state.step + 1) if ramp else 0.0,
        ),
        GaugeMetricFamily(
            "stillhouse_rollout_steps", "Ramp steps configured.", value=float(len(cfg.steps))
        ),
        GaugeMetricFamily(
            "stillhouse_rollout_challenger_version",
            "The registry version under rollout, or last decided (0: none yet).",
            value=float(state.version or 0),
        ),
        CounterMetricFamily(
            "stillhouse_rollout_promotions",
            "Challengers promoted to champion by the controller.",
            value=counts.promotions,
        ),
        CounterMetricFamily(
            "stillhouse_rollout_rollbacks",
            "Challengers rolled back by the controller.",
            value=counts.rollbacks,
        ),
    ]
    for name, at, what in (
        ("promotion", counts.last_promotion_at, "promotion"),
        ("rollback", counts.last_rollback_at, "rollback"),
    ):
        if at is not None:
            out.append(
                GaugeMetricFamily(
                    f"stillhouse_rollout_last_{name}_timestamp_seconds",
                    f"When the controller's last {what} was decided.",
                    value=at,
                )
            )
    if gates is not None:
        status = GaugeMetricFamily(
            "stillhouse_rollout_gate_status",
            "The last gate look: 1 pass, 0 inconclusive, -1 fail.",
            labels=["gate"],
        )
        for gate in GATE_NAMES:
            value = gates.metrics.get(f"gate.{gate}.status")
            if value is not None:
                status.add_metric([gate], value)
        out.append(status)
    if last_tick_at is not None:
        out.append(
            GaugeMetricFamily(
                "stillhouse_rollout_last_tick_timestamp_seconds",
                "When the controller last observed the gateway and the registry.",
                value=last_tick_at,
            )
        )
    return out


class RolloutCollector:
    """Reads the controller's store at each scrape; `observed` is called once per tick. The gate
    status is this process's last look, else the gates behind the journal's last decision."""

    def __init__(
        self,
        load_state: Callable[[], ControllerState | None],
        load_counts: Callable[[], DecisionCounts],
        cfg: ControllerSettings,
        load_last_gates: Callable[[], dict[str, float]] = dict,
    ) -> None:
        self._load_state = load_state
        self._load_counts = load_counts
        self._load_last_gates = load_last_gates
        self._cfg = cfg
        self._lock = threading.Lock()
        self._gates: GateLook | None = None
        self._last_tick_at: float | None = None

    def observed(self, obs: Observation) -> None:
        with self._lock:
            self._last_tick_at = obs.now
            if obs.gates is not None:
                self._gates = obs.gates

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            gates, tick = self._gates, self._last_tick_at
        if gates is None:  # no look by this process yet: the gates behind the last decision
            journaled = self._load_last_gates()
            gates = GateLook("pass", journaled) if journaled else None
        state = self._load_state() or ControllerState()
        yield from rollout_families(state, self._cfg, self._load_counts(), gates, tick)


def merge_families(texts: Iterable[str]) -> list[Metric]:
    """Parse text-exposition documents and merge same-named families (one family per name, as
    the exposition format requires). Raises ValueError for a document that does not parse."""
    return _merge(list(text_string_to_metric_families(text)) for text in texts)


def _merge(documents: Iterable[list[Metric]]) -> list[Metric]:
    merged: dict[str, Metric] = {}
    for families in documents:
        for family in families:
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = family
    return list(merged.values())


class JobFilesCollector:
    """Serves the `*.prom` files of a directory; a file that cannot be read or parsed (a hand
    edit: the writers replace files atomically) is logged and left out, the others still
    served."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        documents = []
        for path in sorted(self.directory.glob("*.prom")):
            try:
                documents.append(list(text_string_to_metric_families(path.read_text())))
            except (OSError, ValueError) as e:
                log.warning("skipping %s: %s", path, e)
        yield from _merge(documents)


def counts_from_rows(rows: Iterable[tuple[str, int, float]]) -> DecisionCounts:
    """`DecisionCounts` from journal aggregates: (action, count, last decision time) rows."""
    by_action = {action: (n, last) for action, n, last in rows}
    promotions, last_promotion = by_action.get("promote", (0, None))
    rollbacks, last_rollback = by_action.get("rollback", (0, None))
    return DecisionCounts(promotions, rollbacks, last_promotion, last_rollback)


class MetricsServer:
    """A /metrics HTTP server on its own thread (prometheus_client's WSGI server)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            self._httpd: WSGIServer = start_http_server(port, addr=host, registry=registry)[0]
        except OSError as e:
            raise UsageError(
                f"cannot serve metrics on {host}:{port}: {e.strerror or e}; set "
                "rollout.controller.metrics_port (0 turns it off)"
            ) from None
        self.url = f"http://{host}:{self._httpd.server_port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def controller_registry(
    metrics_dir: Path, store: ControllerStore, cfg: ControllerSettings
) -> tuple[RolloutCollector, CollectorRegistry]:
    """The controller's collectors on their own registry (no globals)."""
    collector = RolloutCollector(
        store.load,
        lambda: counts_from_rows(store.executed_counts()),
        cfg,
        store.last_gate_metrics,
    )
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    registry.register(JobFilesCollector(metrics_dir))
    return collector, registry


def serve_controller_metrics(
    registry: CollectorRegistry, cfg: ControllerSettings
) -> MetricsServer | None:
    """Its HTTP server, unless `cfg.metrics_port` is 0. Start it once the controller holds its
    lock: a second controller must be refused by the lock (naming the holder), not by a port."""
    if not cfg.metrics_port:
        return None
    return MetricsServer(registry, cfg.metrics_host, cfg.metrics_port)
