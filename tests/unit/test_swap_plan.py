"""The hot-swap plan (`serving/swap_plan.py`): what the model watcher does for each role,
given the versions it serves, the registry's answer and what is running; table-style."""

from __future__ import annotations

import pytest

from stillhouse.common.calibration_tags import CALIBRATION_TAG_PREFIX as P
from stillhouse.serving.engines.swap_plan import RoleView, plan, retry_delay

V1, V2, V3 = (f"models:/student/{n}" for n in (1, 2, 3))
FIT = {P + "threshold": "-0.3", P + "certified": "true", P + "signal": "mean_logprob",
       P + "hold_tokens": "4"}  # fmt: skip


def view(role: str = "champion", serving: str | None = V1, wanted: str | None = V1, **kw):
    return RoleView(role, serving, wanted, **kw)


PLANS = {
    "unchanged": ([view()], set(), [("champion", "noop", V1)]),
    "tags changed": ([view(wanted_tags=FIT)], set(), [("champion", "retag", V1)]),
    "alias moved": ([view(wanted=V2)], set(), [("champion", "start", V2)]),
    "moved to a running server": ([view(wanted=V2)], {(V2, ())}, [("champion", "reuse", V2)]),
    "running with other vLLM args": (
        [view(wanted=V2)], {(V2, ("--enforce-eager",))}, [("champion", "start", V2)],
    ),
    "rollback to a stopped version": (
        [view(serving=V2, wanted=V1)], {(V2, ())}, [("champion", "start", V1)],
    ),
    "champion alias unset": ([view(wanted=None)], set(), [("champion", "hold", V1)]),
    "challenger alias unset": (
        [view(), view("challenger", V2, None)], set(),
        [("champion", "noop", V1), ("challenger", "remove", None)],
    ),
    "no challenger, none wanted": (
        [view(), view("challenger", None, None)], set(),
        [("champion", "noop", V1), ("challenger", "noop", None)],
    ),
    "challenger appears": (
        [view(), view("challenger", None, V3)], set(),
        [("champion", "noop", V1), ("challenger", "start", V3)],
    ),
    "challenger names the champion's version": (
        [view(), view("challenger", V2, V1)], set(),
        [("champion", "noop", V1), ("challenger", "remove", None)],
    ),
    "promotion, challenger alias kept": (
        [view("challenger", V2, V2), view(wanted=V2)], {(V1, ()), (V2, ())},
        [("champion", "reuse", V2), ("challenger", "remove", None)],
    ),
    "promotion, challenger alias deleted": (
        [view(wanted=V2), view("challenger", V2, None)], {(V1, ()), (V2, ())},
        [("champion", "reuse", V2), ("challenger", "remove", None)],
    ),
    "champion holds, challenger on its old version": (
        [view(wanted=None), view("challenger", V2, V1)], set(),
        [("champion", "hold", V1), ("challenger", "remove", None)],
    ),
    "start failed a moment ago": (
        [view(wanted=V2, retry=(V2, 130.0))], set(), [("champion", "wait", V2)],
    ),
    "back-off over": ([view(wanted=V2, retry=(V2, 90.0))], set(), [("champion", "start", V2)]),
    "another version than the failed one": (
        [view(wanted=V2, retry=(V3, 130.0))], set(), [("champion", "start", V2)],
    ),
    "fixed version: tags only": (
        [view(swappable=False, wanted_tags=FIT)], set(), [("champion", "retag", V1)],
    ),
    "base_url never swapped": (
        [view(serving="http://x/v1", wanted=V2, swappable=False)], set(),
        [("champion", "noop", V2)],
    ),
    "fixed version gone": (
        [view(wanted=None, swappable=False)], set(), [("champion", "noop", V1)],
    ),
}  # fmt: skip


@pytest.mark.parametrize("views,running,expected", PLANS.values(), ids=PLANS.keys())
def test_plan(views, running, expected):
    assert [(a.role, a.kind, a.target) for a in plan(views, running, now=100.0)] == expected


def test_failed_starts_back_off_doubling_up_to_ten_minutes():
    assert [retry_delay(n) for n in (1, 2, 3, 4, 10)] == [30, 60, 120, 240, 600]
