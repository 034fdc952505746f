"""When the demo stops waiting for the controller's decision on a challenger."""

from __future__ import annotations

import pytest

from stillhouse.demo.cycle import gave_up


@pytest.mark.parametrize(
    ("now", "last_step", "expected"),
    [
        (100.0, 0.0, None),  # just started
        (1300.0, 1250.0, None),  # past the old fixed 1200 s budget, but the controller is moving
        (1300.0, 300.0, "took no step for 1000 s"),  # stuck
        (950.0, 0.0, "took no step for 950 s"),  # no step at all since the start
        (4000.0, 3990.0, "undecided after 4000 s"),  # the overall cap
    ],
)
def test_waits_while_the_controller_takes_steps(now, last_step, expected):
    reason = gave_up(now, started=0.0, last_step=last_step, stall_s=900.0, cap_s=3600.0)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_a_step_recorded_before_the_wait_began_counts_from_the_start():
    # rows for the version from before this wait (a resumed cycle) do not make it look stuck
    assert gave_up(500.0, started=100.0, last_step=0.0, stall_s=900.0) is None
