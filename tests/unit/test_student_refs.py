"""Which engines `stillhouse serve` runs when the config names no students: the registry's
aliases, followed; before the first promotion the challenger stands in for the champion."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stillhouse.common.config import EngineRef, EnginesSettings, GatewaySettings, Settings
from stillhouse.common.errors import UsageError
from stillhouse.common.registry import alias_uri
from stillhouse.common.roles import Role
from stillhouse.serving.student_refs import engine_refs, teacher_ref

TEACHER = EngineRef(base_url="http://teacher:8000/v1", served_name="teacher")
NAME = "stillhouse-student"


@dataclass
class FakeVersion:
    uri: str


@dataclass
class FakeRegistry:
    aliases: dict[str, int] = field(default_factory=dict)

    def lookup(self, ref: str) -> FakeVersion | None:
        alias = ref.removeprefix(f"models:/{NAME}@")
        assert ref == alias_uri(NAME, alias), ref
        v = self.aliases.get(alias)
        return None if v is None else FakeVersion(f"models:/{NAME}/{v}")

    def download(self, uri: str) -> Path:
        raise AssertionError("engine_refs downloads nothing")


def settings(**engines: EngineRef) -> Settings:
    return Settings(gateway=GatewaySettings(engines=EnginesSettings(**engines)))


def test_students_follow_their_aliases_when_a_champion_exists():
    said: list[str] = []
    refs = engine_refs(settings(teacher=TEACHER), FakeRegistry({"champion": 2}), said.append)
    assert refs == {
        Role.TEACHER: TEACHER,
        Role.CHAMPION: EngineRef(model=f"models:/{NAME}@champion", served_name="champion"),
        Role.CHALLENGER: EngineRef(model=f"models:/{NAME}@challenger", served_name="challenger"),
    }
    assert said == []


def test_before_the_first_promotion_the_challenger_stands_in_and_says_so():
    said: list[str] = []
    refs = engine_refs(settings(teacher=TEACHER), FakeRegistry({"challenger": 3}), said.append)
    assert refs[Role.CHAMPION] == EngineRef(model=f"models:/{NAME}/3", served_name="champion")
    assert Role.CHALLENGER not in refs
    assert said == [f"no {NAME}@champion yet: the challenger models:/{NAME}/3 serves in its place"]


def test_an_empty_registry_is_one_line_saying_what_to_run():
    with pytest.raises(UsageError, match="run `stillhouse redistill` first"):
        engine_refs(settings(teacher=TEACHER), FakeRegistry(), print)


def test_configured_students_are_taken_as_they_are():
    champion = EngineRef(model="/models/a", served_name="a")
    challenger = EngineRef(model="/models/b", served_name="b")
    cfg = settings(teacher=TEACHER, champion=champion, challenger=challenger)
    refs = engine_refs(cfg, FakeRegistry(), print)
    assert (refs[Role.CHAMPION], refs[Role.CHALLENGER]) == (champion, challenger)


def test_without_a_teacher_the_error_says_which_setting():
    with pytest.raises(UsageError, match=r"gateway\.engines\.teacher"):
        teacher_ref(settings())
    with pytest.raises(UsageError, match=r"gateway\.engines\.teacher"):
        engine_refs(settings(), FakeRegistry({"champion": 1}), print)
