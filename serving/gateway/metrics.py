"""Every Prometheus metric the gateway exports, in one place, on its own registry (no globals).

Names carry the `stillhouse_` prefix and unit suffixes; labels take bounded values only:
arm (champion, challenger), served_by and engine (teacher, champion, challenger, none),
outcome, and fallback reason. Never prompts, users or model versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stillhouse.common.roles import STUDENT_ROLES
from stillhouse.serving.gateway.breaker import STATE_VALUE, State
from stillhouse.serving.gateway.policy import LOW_CONFIDENCE, NO_LOGPROBS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
CONFIDENCE_BUCKETS = (
    -5.0,
    -3.0,
    -2.0,
    -1.5,
    -1.0,
    -0.75,
    -0.5,
    -0.35,
    -0.25,
    -0.15,
    -0.1,
    -0.05,
    0.0,
)

OUTCOMES = ("ok", "client_error", "unavailable", "error")
# The policy's two, then the engine failures' (`upstream.UpstreamFailure.reason`).
FALLBACK_REASONS = (
    LOW_CONFIDENCE,
    "timeout",
    "connection",
    "upstream_5xx",
    "engine_4xx",
    "engine_rejected",
    "circuit_open",
    NO_LOGPROBS,
)
SHED_BUDGETS = ("gateway", "teacher")
MIRROR_OUTCOMES = ("ok", "error", "dropped")
SWAP_ROLES = STUDENT_ROLES  # the teacher is not swapped by alias moves
SWAP_OUTCOMES = ("ok", "start_failed", "drain_timeout", "removed")


class GatewayMetrics:
    """The gateway's metrics on their own registry, grouped by what they watch."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._requests(self.registry)
        self._engines(self.registry)
        self._rollout(self.registry)
        self._shadow(self.registry)
        self._traffic_log(self.registry)

    def export_breaker(self, role: str, state: State) -> None:
        self.circuit_state.labels(role).set(STATE_VALUE[state])

    def _requests(self, r: CollectorRegistry) -> None:
        """What users' requests did: who answered, how fast, fallbacks and confidence."""
        self.requests = Counter(
            "stillhouse_gateway_requests",
            "Requests by A/B arm, the engine that answered and the outcome.",
            ["arm", "served_by", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "stillhouse_gateway_request_duration_seconds",
            "End-to-end request latency at the gateway, by arm.",
            ["arm"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "stillhouse_gateway_time_to_first_token_seconds",
            "Time from request arrival to the first streamed byte, by arm.",
            ["arm"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "stillhouse_gateway_overhead_seconds",
            "Gateway time per request not spent waiting on engines.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "stillhouse_gateway_fallbacks",
            "Requests the teacher answered instead of the student, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason)
        self.confidence = Histogram(
            "stillhouse_gateway_confidence",
            "The student's confidence score (the configured signal), by arm.",
            ["arm"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )

    def _engines(self, r: CollectorRegistry) -> None:
        """The engines' health as the gateway sees it."""
        self.circuit_state = Gauge(
            "stillhouse_gateway_circuit_state",
            "Circuit breaker per engine: 0 closed, 1 half-open, 2 open.",
            ["engine"],
            registry=r,
        )
        self.engine_failures = Counter(
            "stillhouse_gateway_engine_failures",
            "Failed engine attempts (timeouts, stalled streams, connection errors, 5xx, an "
            "engine-side 4xx), by engine: what its circuit breaker counts.",
            ["engine"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "stillhouse_engine_restarts",
            "vLLM servers this gateway started that died and were restarted, by role and "
            "outcome (ok: serving again; failed: gave up after its attempts).",
            ["engine", "outcome"],
            registry=r,
        )
        self.engine_process_up = Gauge(
            "stillhouse_engine_process_up",
            "Whether the vLLM server this gateway started for a role runs (1) or is down or "
            "restarting (0).",
            ["engine"],
            registry=r,
        )
        self.engine_rejections = Counter(
            "stillhouse_gateway_engine_rejections",
            "Requests an engine rejected as invalid (400, 413, 422), by engine and status; not "
            "held against the engine, but a student's are retried on the teacher.",
            ["engine", "status"],
            registry=r,
        )
        self.shed = Counter(
            "stillhouse_gateway_shed",
            "Requests refused at once (503 with Retry-After) because a concurrency budget was "
            "spent, by budget: gateway (all requests) or teacher (fallbacks).",
            ["budget"],
            registry=r,
        )
        for budget in SHED_BUDGETS:
            self.shed.labels(budget)
        self.in_flight = Gauge(
            "stillhouse_gateway_in_flight",
            "Requests in flight against each concurrency budget.",
            ["budget"],
            registry=r,
        )

    def _rollout(self, r: CollectorRegistry) -> None:
        """The A/B split, the mirror and hot swaps: what the rollout controller changes."""
        self.challenger_share = Gauge(
            "stillhouse_gateway_challenger_share",
            "The share of users assigned to the challenger arm.",
            registry=r,
        )
        self.engine_swaps = Counter(
            "stillhouse_engine_swaps",
            "Hot swaps of a role's engine (its registry alias moved), by role and outcome: "
            "ok, start_failed, drain_timeout, removed.",
            ["role", "outcome"],
            registry=r,
        )
        # Created at zero, so a dashboard shows "no swaps yet" rather than no data.
        for role in SWAP_ROLES:
            for outcome in SWAP_OUTCOMES:
                self.engine_swaps.labels(role, outcome)
        self.mirror_share = Gauge(
            "stillhouse_challenger_mirror_share",
            "The share of champion-arm requests also sent to the challenger (mirror phase).",
            registry=r,
        )
        self.mirror_requests = Counter(
            "stillhouse_mirror_requests",
            "Requests mirrored to the challenger (no user sees them), by outcome: ok, error, "
            "dropped (the mirror queue was full or the challenger's circuit open).",
            ["outcome"],
            registry=r,
        )
        for outcome in MIRROR_OUTCOMES:
            self.mirror_requests.labels(outcome)

    def _shadow(self, r: CollectorRegistry) -> None:
        """Shadow scoring: the teacher scoring student answers off the hot path."""
        self.shadow_queue_depth = Gauge(
            "stillhouse_shadow_queue_depth",
            "Shadow-scoring jobs waiting for the teacher.",
            registry=r,
        )
        self.shadow_dropped = Counter(
            "stillhouse_shadow_dropped",
            "Shadow jobs dropped because the queue was full.",
            registry=r,
        )
        self.shadow_scored = Counter(
            "stillhouse_shadow_scored", "Student answers scored by the teacher.", registry=r
        )
        self.shadow_errors = Counter(
            "stillhouse_shadow_errors", "Shadow-scoring calls that failed.", registry=r
        )

    def _traffic_log(self, r: CollectorRegistry) -> None:
        """The durable traffic log's writer."""
        self.traffic_log_write_errors = Counter(
            "stillhouse_traffic_log_write_errors",
            "Traffic-log records lost, one for one: in a failed commit (a full disk, an "
            "unwritable file) or dropped because the writer's queue was full.",
            registry=r,
        )
        self.traffic_log_pending = Gauge(
            "stillhouse_traffic_log_pending_records",
            "Records accepted but not yet committed: what a crash now would lose.",
            registry=r,
        )
        self.traffic_log_commit = Histogram(
            "stillhouse_traffic_log_commit_seconds",
            "Time per traffic-log group commit.",
            buckets=(*OVERHEAD_BUCKETS, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.traffic_log_committed = Counter(
            "stillhouse_traffic_log_records_committed", "Traffic-log records committed.", registry=r
        )


def engine_sd_targets(base_urls: Mapping[str, str]) -> list[dict[str, Any]]:
    """Prometheus HTTP service discovery for the engines behind the gateway: one target group
    per role, labelled `model_role`, so the dashboard can tell vLLM's metrics apart by role.
    `base_urls` maps a role to its engine's OpenAI base URL (".../v1"); vLLM serves /metrics
    at the server's root."""
    groups = []
    for role, base_url in sorted(base_urls.items()):
        url = urlsplit(base_url)
        root = url.path.rstrip("/").removesuffix("/v1")
        groups.append(
            {
                "targets": [url.netloc],
                "labels": {
                    "model_role": role,
                    "__scheme__": url.scheme,
                    "__metrics_path__": f"{root}/metrics",
                },
            }
        )
    return groups
