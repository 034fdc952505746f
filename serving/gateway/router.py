"""Which engine serves a request: the engines table, the live A/B split and the mirror share.

    arm = router.assign(user_key)            # sticky A/B (assignment.py); champion alone
    engine = router.engines[arm]             #   while no challenger is routed to
    await router.set_split(0.25, seed, actor)          # admin API; logged as an `AbChange`
    old = router.swap_engine(Role.CHAMPION, new)       # hot swap (engines/watcher.py) ...
    await router.drain(old, timeout_s)                 # ... then wait for its requests

One event loop owns the table, so a swap is atomic for every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from stillhouse.common.roles import Role
from stillhouse.common.traffic import AbChange
from stillhouse.serving.gateway.assignment import Arm, assign_arm
from stillhouse.serving.gateway.metrics import GatewayMetrics
from stillhouse.serving.gateway.traffic_log import TrafficLogWriter
from stillhouse.serving.gateway.upstream import Engine

log = logging.getLogger("stillhouse.gateway")

DRAIN_POLL_S = 0.05


@dataclass
class AbState:
    """The live A/B split; the admin API changes it, the traffic log records each change."""

    share: float
    seed: str
    # Mirror phase: the fraction of champion-arm requests also sent to the challenger in the
    # background (mirror.py); no user changes arm, so not an AbChange.
    mirror: float = 0.0


class Router:
    """The routing state of one gateway process, changed by the admin API and the watcher."""

    def __init__(
        self,
        engines: dict[Role, Engine],
        ab: AbState,
        writer: TrafficLogWriter,
        metrics: GatewayMetrics,
    ) -> None:
        self.engines = engines
        self.ab = ab
        self.writer = writer
        self.metrics = metrics

    @property
    def has_challenger(self) -> bool:
        return Role.CHALLENGER in self.engines

    @property
    def share_in_force(self) -> float:
        """The challenger's share as it applies: 0 with no challenger engine, or with one that
        may serve no users (`Engine.share_refused`: a version not certified), else the split's."""
        challenger = self.engines.get(Role.CHALLENGER)
        if challenger is None or challenger.share_refused is not None:
            return 0.0
        return self.ab.share

    def assign(self, key: str) -> Arm:
        share = self.share_in_force
        if share == 0.0:
            return Role.CHAMPION
        return assign_arm(key, self.ab.seed, share)

    # --- the split and the mirror share ------------------------------------------------------

    async def set_split(self, share: float, seed: str, actor: str) -> AbChange:
        """Change the split; returns once the change is in the traffic log, which records the
        shares in force (what the sample-ratio check must compare with)."""
        before, previous_seed = self.share_in_force, self.ab.seed
        self.ab.share, self.ab.seed = share, seed
        change = AbChange(time.time(), self.share_in_force, seed, before, previous_seed, actor)
        self.export_shares()
        log.info(
            "A/B changed by %s: share %.4f -> %.4f, seed %r -> %r",
            actor,
            change.previous_share,
            share,
            change.previous_seed,
            seed,
        )
        await asyncio.wrap_future(self.writer.submit(change))
        return change

    def set_mirror_share(self, share: float, actor: str) -> float:
        """Change the mirror share; returns the previous one. Logged, exported, but not an
        `AbChange`: no user changes arm, so the sample-ratio check has nothing to learn."""
        previous, self.ab.mirror = self.ab.mirror, share
        self.export_shares()
        log.info("mirror share changed by %s: %.4f -> %.4f", actor, previous, share)
        return previous

    def export_shares(self) -> None:
        """The gauges: the shares in force (0 while there is no challenger engine)."""
        self.metrics.challenger_share.set(self.share_in_force)
        self.metrics.mirror_share.set(self.ab.mirror if self.has_challenger else 0.0)

    # --- the engines (hot swap) --------------------------------------------------------------

    def swap_engine(self, role: Role, engine: Engine) -> Engine | None:
        """Route `role` to `engine` from now on and return the engine it replaces (None: the
        role is new). No await: atomic for every request; those already running keep the
        Engine they picked (drain it before stopping its server)."""
        before = self.share_in_force
        old = self.engines.get(role)
        self.engines[role] = engine
        self.metrics.export_breaker(role, engine.breaker.current_state())
        self.note_share_in_force(before)
        return old

    def remove_engine(self, role: Role) -> Engine | None:
        """Stop routing to `role` (only the challenger may go); returns its engine, to drain."""
        if role in (Role.TEACHER, Role.CHAMPION):
            raise ValueError(f"the gateway cannot run without a {role}")
        before = self.share_in_force
        old = self.engines.pop(role, None)
        if old is not None:
            with contextlib.suppress(KeyError):
                self.metrics.circuit_state.remove(role)
            self.note_share_in_force(before)
        return old

    async def drain(self, engine: Engine, timeout_s: float) -> bool:
        """Wait until no request uses `engine` any more; False if some still do at the end."""
        deadline = time.monotonic() + timeout_s
        while engine.in_flight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(DRAIN_POLL_S)
        return True

    def note_share_in_force(self, before: float, actor: str = "engine-watcher") -> None:
        """Record a change of the share in force since `before` (a challenger came, went, or
        was refused users) without an admin call: logged like one, so the A/B sample-ratio
        check knows which share applied to every request."""
        share = self.share_in_force
        if share == before:
            return
        self.export_shares()
        log.info("challenger share in force changed by %s: %.4f -> %.4f", actor, before, share)
        self.writer.submit(AbChange(time.time(), share, self.ab.seed, before, self.ab.seed, actor))
