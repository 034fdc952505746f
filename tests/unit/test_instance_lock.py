"""The one-at-a-time lock: refused at once for a second instance, or waited for (a build)."""

from __future__ import annotations

import threading

import pytest

from stillhouse.common.instance_lock import instance_lock


class Locked(Exception):
    pass


def test_a_second_holder_is_refused_at_once_naming_the_first(tmp_path):
    path = tmp_path / "lock"
    with (
        instance_lock(path, Locked),
        pytest.raises(Locked, match=r"pid \d+"),
        instance_lock(path, Locked),
    ):
        pass


def test_a_waiting_holder_is_told_who_and_gets_the_lock_once_it_is_free(tmp_path):
    path = tmp_path / "lock"
    told: list[str] = []
    got = threading.Event()

    def second() -> None:
        with instance_lock(path, Locked, wait=told.append):
            got.set()

    with instance_lock(path, Locked):
        thread = threading.Thread(target=second)
        thread.start()
        assert not got.wait(0.5)  # blocked while the first holds it
    thread.join(timeout=10)
    assert got.is_set() and len(told) == 1 and told[0].startswith("pid ")
