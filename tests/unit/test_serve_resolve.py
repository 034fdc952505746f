"""`stillhouse serve`'s view of its roles: what it starts, what the model watcher follows, and
where each engine's calibration tags come from (a fake registry; nothing is started)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from stillhouse.common.config import EngineRef, Settings
from stillhouse.common.registry import RegistryError, VersionInfo
from stillhouse.serving.serve import resolve_engines, watched_roles

TAGS = {"stillhouse.calibration.threshold": "-0.4", "teacher": "t1"}


class Registry:
    def __init__(self, root: Path, aliases: dict[str, int]) -> None:
        self.root, self.aliases = root, aliases

    def lookup(self, ref: str) -> VersionInfo | None:
        version = self.aliases.get(ref.rpartition("@")[2]) if "@" in ref else int(ref[-1])
        if version is None:
            return None
        return VersionInfo("s", version, (), datetime.now(UTC), None, "src", dict(TAGS))

    def download(self, uri: str) -> Path:
        path = self.root / uri.rpartition("/")[2]
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        return path


def refs(tmp_path: Path, **roles: EngineRef) -> dict[str, EngineRef]:
    teacher = tmp_path / "teacher"
    teacher.mkdir(exist_ok=True)
    (teacher / "config.json").write_text("{}")
    return {"teacher": EngineRef(model=str(teacher)), **roles}


def resolve(tmp_path: Path, aliases: dict[str, int], **roles: EngineRef):
    given = refs(tmp_path, **roles)
    engines = resolve_engines(given, Settings(state_dir=tmp_path), Registry(tmp_path, aliases))
    return engines, {r.role: r for r in watched_roles(engines, given)}


CHAMPION = EngineRef(model="models:/s@champion")
CHALLENGER = EngineRef(model="models:/s@challenger")


def test_aliases_are_followed_and_hot_swapped(tmp_path):
    engines, roles = resolve(tmp_path, {"champion": 1, "challenger": 2},
                             champion=CHAMPION, challenger=CHALLENGER)  # fmt: skip
    assert engines["champion"].ref == "models:/s/1" and engines["challenger"].ref == "models:/s/2"
    assert roles["champion"].follow == "models:/s@champion" and roles["champion"].swappable
    assert roles["champion"].serving == "models:/s/1"
    assert roles["champion"].pool_key == ("models:/s/1", ())
    assert roles["champion"].tags == {"stillhouse.calibration.threshold": "-0.4"}
    assert "teacher" not in roles


@pytest.mark.parametrize("aliases", [{"champion": 1}, {"champion": 1, "challenger": 1}])
def test_a_challenger_alias_unset_or_on_the_champion_is_followed_not_started(tmp_path, aliases):
    engines, roles = resolve(tmp_path, aliases, champion=CHAMPION, challenger=CHALLENGER)
    assert "challenger" not in engines
    challenger = roles["challenger"]
    assert challenger.follow == "models:/s@challenger" and challenger.swappable
    assert challenger.serving is None and challenger.served_name == "challenger"


def test_an_unset_champion_alias_is_an_error(tmp_path):
    with pytest.raises(RegistryError, match="has alias 'champion'"):
        resolve(tmp_path, {}, champion=CHAMPION)


def test_fixed_versions_and_running_engines_follow_only_their_tags(tmp_path):
    running = EngineRef(base_url="http://vllm:8000/v1/", model_uri="models:/s/3")
    engines, roles = resolve(tmp_path, {}, champion=EngineRef(model="models:/s/2"),
                             challenger=running)  # fmt: skip
    assert roles["champion"].follow == "models:/s/2" and not roles["champion"].swappable
    assert roles["challenger"].follow == "models:/s/3" and not roles["challenger"].swappable
    assert roles["challenger"].pool_key is None and engines["challenger"].model_dir is None
    assert roles["challenger"].tags == {"stillhouse.calibration.threshold": "-0.4"}


def test_a_model_directory_is_neither_followed_nor_tagged(tmp_path):
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _, roles = resolve(tmp_path, {}, champion=EngineRef(model=str(model)))
    assert roles["champion"].follow is None and roles["champion"].tags is None


class RolledBackRegistry(Registry):
    def lookup(self, ref: str) -> VersionInfo | None:
        info = super().lookup(ref)
        if info is not None and info.version == 2:
            info.tags["stillhouse.rollout.outcome"] = "rolled_back"
        return info


def test_a_rolled_back_challenger_still_holding_its_alias_is_not_started(tmp_path):
    given = refs(tmp_path, champion=CHAMPION, challenger=CHALLENGER)
    registry = RolledBackRegistry(tmp_path, {"champion": 1, "challenger": 2})
    engines = resolve_engines(given, Settings(state_dir=tmp_path), registry)
    assert "challenger" not in engines
    roles = {r.role: r for r in watched_roles(engines, given)}
    assert roles["challenger"].serving is None  # followed: a new challenger is served
    forced = Settings(state_dir=tmp_path, gateway={"ab": {"serve_rolled_back": True}})
    assert "challenger" in resolve_engines(given, forced, registry)
