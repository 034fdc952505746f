"""The gateway's registry cache: every live answer is written through, and at start-up an
unreachable registry is answered from the last answer, noted until a live answer clears it; the
registry's own answers (no such version) and a reference never answered still fail."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from stillhouse.common.registry import RegistryError, RegistryUnreachable, VersionInfo
from stillhouse.serving.engines.registry_view import RegistryCache

CHAMPION = "models:/stillhouse-student@champion"
CHALLENGER = "models:/stillhouse-student@challenger"


def version(n: int, **tags: str) -> VersionInfo:
    created = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    return VersionInfo("stillhouse-student", n, ("champion",), created, "r1", "runs:/r1/model",
                       dict(tags), {"kl": 0.01})  # fmt: skip


class Registry:
    """A registry that answers from `aliases`, or is down."""

    def __init__(self, aliases: dict[str, VersionInfo | None]) -> None:
        self.aliases = aliases
        self.down = False
        self.calls = 0

    def lookup(self, ref: str) -> VersionInfo | None:
        self.calls += 1
        if self.down:
            raise RegistryUnreachable(
                "cannot reach MLflow at http://mlflow:5000: connection refused"
            )
        if ref not in self.aliases:
            raise RegistryError(f"no such reference {ref}")
        return self.aliases[ref]

    def download(self, uri: str) -> Path:
        return Path("/cache") / uri.rsplit("/", 1)[1]


def test_a_live_answer_is_written_through_and_returned_as_is(tmp_path):
    v2 = version(2, **{"stillhouse.calibration.certified": "true"})
    cache = RegistryCache(Registry({CHAMPION: v2}), tmp_path / "registry.json", clock=lambda: 100.0)
    assert cache.at_start().lookup(CHAMPION) == v2
    stored = json.loads((tmp_path / "registry.json").read_text())
    assert stored["answers"][CHAMPION]["at"] == 100.0
    assert VersionInfo.from_dict(stored["answers"][CHAMPION]["info"]) == v2
    assert cache.fallbacks == {}


def test_a_restart_with_the_registry_down_starts_on_the_last_answers_and_says_so(tmp_path):
    path = tmp_path / "registry.json"
    registry = Registry({CHAMPION: version(2, note="x"), CHALLENGER: None})
    before = RegistryCache(registry, path, clock=lambda: 100.0)
    before.lookup(CHAMPION)
    before.lookup(CHALLENGER)
    registry.down = True
    after = RegistryCache(registry, path, clock=lambda: 200.0)  # the next gateway process
    start = after.at_start()
    info = start.lookup(CHAMPION)
    assert info is not None and (info.version, info.tags, info.metrics) == (
        2,
        {"note": "x"},
        {"kl": 0.01},
    )
    assert start.lookup(CHALLENGER) is None  # unset then: unset now
    status = after.status()["from_cache"]
    assert status[CHAMPION]["answer"] == "models:/stillhouse-student/2"
    assert status[CHAMPION]["stored_at"] == 100.0
    assert "connection refused" in status[CHAMPION]["error"]
    assert start.download("models:/stillhouse-student/2") == Path("/cache/2")


def test_the_watchers_lookup_still_fails_while_down_and_a_live_answer_clears_the_note(tmp_path):
    registry = Registry({CHAMPION: version(2)})
    cache = RegistryCache(registry, tmp_path / "registry.json")
    cache.lookup(CHAMPION)
    registry.down = True
    cache.at_start().lookup(CHAMPION)
    with pytest.raises(RegistryUnreachable):  # the watcher sees the outage and keeps what runs
        cache.lookup(CHAMPION)
    assert CHAMPION in cache.fallbacks
    registry.down = False
    registry.aliases[CHAMPION] = version(3)
    assert cache.lookup(CHAMPION) == version(3)  # watching again: the move is seen
    assert cache.fallbacks == {}
    restarted = RegistryCache(registry, tmp_path / "registry.json")
    registry.down = True
    assert restarted.at_start().lookup(CHAMPION) == version(3)  # the newest answer is kept


def test_only_an_unreachable_registry_falls_back_not_its_own_answer(tmp_path):
    registry = Registry({CHAMPION: version(2)})
    cache = RegistryCache(registry, tmp_path / "registry.json")
    cache.lookup(CHAMPION)
    registry.aliases.clear()
    with pytest.raises(RegistryError, match="no such reference") as err:
        cache.at_start().lookup(CHAMPION)
    assert not isinstance(err.value, RegistryUnreachable)


def test_a_reference_never_answered_fails_with_what_to_do(tmp_path):
    registry = Registry({})
    registry.down = True
    cache = RegistryCache(registry, tmp_path / "registry.json")
    with pytest.raises(RegistryUnreachable) as err:
        cache.at_start().lookup(CHAMPION)
    message = str(err.value)
    assert "connection refused" in message and "no earlier answer" in message
    assert "\n" not in message


def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, caplog):
    path = tmp_path / "registry.json"
    path.write_text("{not json")
    cache = RegistryCache(Registry({CHAMPION: version(2)}), path)
    with caplog.at_level(logging.WARNING, logger="stillhouse.registry_cache"):
        assert cache.lookup(CHAMPION) == version(2)
    assert "ignoring the registry cache" in caplog.text
    assert json.loads(path.read_text())["schema"] == 1


def test_an_unwritable_cache_never_fails_a_live_answer_and_warns_once(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = RegistryCache(Registry({CHAMPION: version(2)}), blocker / "registry.json")
    with caplog.at_level(logging.WARNING, logger="stillhouse.registry_cache"):
        assert cache.lookup(CHAMPION) == version(2)
        assert cache.lookup(CHAMPION) == version(2)
    assert caplog.text.count("cannot write the registry cache") == 1
    assert caplog.text.count("ignoring the registry cache") == 1
