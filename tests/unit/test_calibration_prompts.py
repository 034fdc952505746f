"""Where calibration's held-out prompts come from: the configured prompt files (the demo's ticket
splits among them, equal to what the demo produced before it was a plug-in), or the newest
distinct chat prompts of the traffic log, split alternately."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from stillhouse.common.config import Settings
from stillhouse.common.errors import UsageError
from stillhouse.common.prompts import triage_user_message
from stillhouse.common.traffic import INSERT_SQL, TrafficRecord, create_schema, to_row
from stillhouse.demo.corpus import Ticket, read_jsonl, write_jsonl
from stillhouse.rollout.calibration.prompts import (
    calibration_prompts,
    heldout_prompts_from_traffic,
    prompts_from_file,
)


def messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": triage_user_message(text)}]


def settings_with(tmp_path: Path, **calibration: Any) -> Settings:
    return Settings.model_validate(
        {"state_dir": str(tmp_path), "rollout": {"calibration": calibration}}
    )


def tickets(split: str, n: int) -> list[Ticket]:
    return [
        Ticket(f"{split}-{i}", f"{split} ticket {i}: my invoice is wrong", "billing", "high", split)
        for i in range(n)
    ]


def test_a_demo_ticket_file_gives_what_the_demo_branch_gave(tmp_path):
    """`load_prompt_file(val file)[:n]` as chat messages is exactly what calibration used to
    build from the demo world itself: one user turn, the triage prompt of each ticket, in file
    order."""
    path = tmp_path / "val.jsonl"
    write_jsonl(tickets("val", 30), path)
    n = 20
    before = [[{"role": "user", "content": triage_user_message(t.text)}] for t in read_jsonl(path)]
    assert prompts_from_file(path, n) == before[:n]
    assert len(prompts_from_file(path, 100)) == 30  # a short file gives what it has


def test_the_configured_files_give_both_sets_in_file_order(tmp_path):
    val, test = tmp_path / "val.jsonl", tmp_path / "test.jsonl"
    write_jsonl(tickets("val", 25), val)
    write_jsonl(tickets("test", 25), test)
    settings = settings_with(
        tmp_path, holdout_size=20, prompts_file=str(val), test_prompts_file=str(test)
    )
    prompts, test_prompts = calibration_prompts(settings)
    assert prompts == [messages(t.text) for t in read_jsonl(val)[:20]]
    assert test_prompts == [messages(t.text) for t in read_jsonl(test)[:20]]


def test_a_prompts_file_of_chat_messages_and_plain_prompts_without_a_test_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"}]},
        {"prompt": "b"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    prompts, test_prompts = calibration_prompts(settings_with(tmp_path, prompts_file=str(path)))
    assert prompts == [lines[0]["messages"], [{"role": "user", "content": "b"}]]
    assert test_prompts is None  # no fresh set: no check on one


def test_a_test_file_without_a_prompts_file_is_a_config_error(tmp_path):
    with pytest.raises(ValidationError, match="prompts_file"):
        settings_with(tmp_path, test_prompts_file=str(tmp_path / "test.jsonl"))


def test_without_files_the_traffic_log_is_split_alternately(tmp_path):
    settings = settings_with(tmp_path, holdout_size=20)
    now = time.time()
    items = [_record(i, now - 100 + i, json.dumps(messages(f"ticket {i}"))) for i in range(50)]
    write(settings, items)
    prompts, test_prompts = calibration_prompts(settings)
    newest = [messages(f"ticket {i}") for i in range(49, 9, -1)]  # the newest 40, newest first
    assert prompts == newest[0::2] and test_prompts == newest[1::2]


def write(settings: Settings, items: list[TrafficRecord]) -> None:
    conn = sqlite3.connect(settings.traffic_log_path)
    create_schema(conn)
    with conn:
        for item in items:
            conn.execute(INSERT_SQL[type(item)], to_row(item))
    conn.close()


def _record(i: int, ts: float, prompt: str | None, **kw: Any) -> TrafficRecord:
    fields = dict(
        request_id=f"r{i}",
        ts=ts,
        endpoint="chat",
        arm="champion",
        served_by="champion",
        status=200,
        latency_s=0.1,
        prompt=prompt,
    )
    fields.update(kw)
    return TrafficRecord(**fields)  # type: ignore[arg-type]


def test_heldout_prompts_are_the_newest_distinct_chat_prompts(tmp_path):
    settings = Settings.model_validate({"state_dir": str(tmp_path)})
    now = time.time()
    p = [json.dumps(messages(f"ticket {i}")) for i in range(6)]
    items = [
        _record(0, now - 5 * 3600, p[0]),  # five hours back: found only by widening
        _record(1, now - 60, p[1]),
        _record(2, now - 50, p[2]),
        _record(3, now - 40, p[1]),  # a repeat of p1, newer
        _record(4, now - 30, p[3], endpoint="completions"),
        _record(5, now - 20, None),  # prompts not logged
        _record(6, now - 10, p[4], status=500),
        _record(7, now - 5, json.dumps("just a string")),
    ]
    conn = sqlite3.connect(settings.traffic_log_path)
    create_schema(conn)
    with conn:
        for item in items:
            conn.execute(INSERT_SQL[type(item)], to_row(item))
    conn.close()
    assert heldout_prompts_from_traffic(settings, 2) == [
        messages("ticket 1"),
        messages("ticket 2"),
    ]
    everything = heldout_prompts_from_traffic(settings, 10)
    assert everything == [messages("ticket 1"), messages("ticket 2"), messages("ticket 0")]


def test_heldout_prompts_without_a_log_or_without_prompts_is_a_usage_error(tmp_path):
    settings = Settings.model_validate({"state_dir": str(tmp_path)})
    with pytest.raises(UsageError, match="no traffic log"):
        heldout_prompts_from_traffic(settings, 5)
    conn = sqlite3.connect(settings.traffic_log_path)
    create_schema(conn)
    with conn:
        item = _record(0, time.time(), None)
        conn.execute(INSERT_SQL[type(item)], to_row(item))
    conn.close()
    with pytest.raises(UsageError, match="log_prompts"):
        heldout_prompts_from_traffic(settings, 5)
