"""A gate's status, one definition for the gates and the controller (and their metrics).

    GateStatus          "pass" | "fail" | "inconclusive"
    combined_status     the status of a look from its gates' statuses (any fail, else any
                        inconclusive, else pass)
    STATUS_VALUE        the number a status is exported as: 1 pass, 0 inconclusive, −1 fail
    GATE_NAMES          the gates, in the order every look reports them

Kept apart from `rollout.gates` so the controller's pure core can name a status without
importing the statistics behind the gates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

GateStatus = Literal["pass", "fail", "inconclusive"]
GATE_STATUSES: tuple[GateStatus, ...] = ("pass", "fail", "inconclusive")
STATUS_VALUE: dict[GateStatus, float] = {"pass": 1.0, "inconclusive": 0.0, "fail": -1.0}
GATE_NAMES = ("not_worse", "win_or_tie", "divergence", "fallback", "latency", "srm")


def combined_status(statuses: Iterable[GateStatus]) -> GateStatus:
    """The status of a look: "fail" if any gate fails, else "inconclusive" if any is, else
    "pass"."""
    seen = set(statuses)
    if "fail" in seen:
        return "fail"
    return "inconclusive" if "inconclusive" in seen else "pass"
