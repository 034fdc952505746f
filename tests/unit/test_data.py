import json
from datetime import UTC, datetime, timedelta

import pytest

from stillhouse.common.errors import UsageError
from stillhouse.rollout.distill.data import load_prompt_file, parse_record, select_prompts

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def _rec(text: str, days_ago: float | None = None):
    obj: dict = {"prompt": text}
    if days_ago is not None:
        obj["timestamp"] = (NOW - timedelta(days=days_ago)).isoformat()
    return parse_record(obj, "test")


def test_the_three_record_shapes_become_chat_messages():
    chat = parse_record({"messages": [{"role": "user", "content": "hi"}]}, "x")
    plain = parse_record({"prompt": "hi"}, "x")
    ticket = parse_record({"text": "my card", "category": "billing", "priority": "low"}, "x")
    assert chat.chat == plain.chat == [{"role": "user", "content": "hi"}]
    assert chat.key == plain.key
    assert ticket.chat[0]["content"].endswith("ticket: my card")
    assert ticket.label_dict == {"category": "billing", "priority": "low"}


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2], "JSON object"),
        ({"nothing": 1}, "needs 'messages'"),
        ({"messages": []}, "non-empty"),
        ({"messages": [{"role": "user"}]}, "non-empty"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "assistant"),
        ({"prompt": "x", "timestamp": "yesterday"}, "ISO-8601"),
        ({"prompt": "x", "timestamp": "2026-11-01T00:00:00"}, "time zone"),
    ],
)
def test_bad_records_are_usage_errors_naming_the_place(obj, message):
    with pytest.raises(UsageError, match=message) as info:
        parse_record(obj, "file.jsonl:7")
    assert "file.jsonl:7" in str(info.value)


def test_prompt_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{not json}\n')
    with pytest.raises(UsageError, match=r"p\.jsonl:3: not valid JSON"):
        load_prompt_file(path)
    with pytest.raises(UsageError, match="not found"):
        load_prompt_file(tmp_path / "missing.jsonl")
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    assert len(load_prompt_file(path)) == 1


def test_window_dedup_cap_and_heldout_are_counted():
    records = [_rec(f"p{i}", days_ago=i * 0.5) for i in range(30)]  # 0 .. 14.5 days old
    records += [_rec("p0", days_ago=0.1), _rec("undated")]
    sel = select_prompts(
        records, now=NOW, window=timedelta(days=7), max_prompts=10, heldout_share=0.2, seed=0
    )
    assert sel.counts["loaded"] == 32
    assert sel.counts["out_of_window"] == 15  # 7.5 .. 14.5 days old
    assert sel.counts["duplicate"] == 1
    assert sel.counts["over_cap"] == 16 - 10
    assert len(sel.train) == 8 and len(sel.heldout) == 2
    assert not {r.key for r in sel.train} & {r.key for r in sel.heldout}


def test_cap_keeps_the_newest_prompts():
    records = [_rec(f"p{i}", days_ago=i) for i in range(6)]
    sel = select_prompts(records, now=NOW, window=None, max_prompts=3, heldout_share=0.34, seed=0)
    kept = {r.chat[0]["content"] for r in [*sel.train, *sel.heldout]}
    assert kept == {"p0", "p1", "p2"}


def test_selection_and_its_hash_are_deterministic_and_order_independent():
    records = [_rec(f"p{i}") for i in range(50)]
    a = select_prompts(records, now=NOW, window=None, max_prompts=50, heldout_share=0.1, seed=3)
    b = select_prompts(
        records[::-1], now=NOW, window=None, max_prompts=50, heldout_share=0.1, seed=3
    )
    assert a.dataset_hash == b.dataset_hash
    other = select_prompts(
        records[:-1], now=NOW, window=None, max_prompts=50, heldout_share=0.1, seed=3
    )
    assert other.dataset_hash != a.dataset_hash


def test_nothing_left_to_train_on_is_a_usage_error():
    with pytest.raises(UsageError, match="no prompts left"):
        select_prompts(
            [_rec("old", days_ago=30)],
            now=NOW,
            window=timedelta(days=7),
            max_prompts=10,
            heldout_share=0.1,
            seed=0,
        )


def test_a_judge_score_filter_without_a_judge_is_refused_before_any_work(tmp_path):
    from rich.console import Console

    from stillhouse.common.config import FilterSettings, RedistillSettings, Settings
    from stillhouse.rollout.distill.pipeline import redistill

    settings = Settings(
        state_dir=tmp_path, redistill=RedistillSettings(filter=FilterSettings(min_judge_score=4))
    )
    with pytest.raises(UsageError, match="min_judge_score"):
        redistill(settings, Console(quiet=True))
    assert not (tmp_path / "demo").exists()  # nothing was built


def test_a_config_that_cannot_train_is_refused_before_any_work(tmp_path):
    from rich.console import Console

    from stillhouse.common.config import KdSettings, RedistillSettings, Settings
    from stillhouse.rollout.distill.pipeline import redistill

    # grey-box targets are top-k log-probabilities at temperature 1
    settings = Settings(
        state_dir=tmp_path, redistill=RedistillSettings(kd=KdSettings(temperature=2.0))
    )
    with pytest.raises(UsageError, match="temperature") as info:
        redistill(settings, Console(quiet=True))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("redistill", "setting"),
    [
        ({}, "redistill.data.source"),
        ({"data": {"source": "prompts.jsonl"}}, "redistill.teacher.model"),
    ],
)
def test_a_run_without_its_prompts_or_teacher_names_the_setting(tmp_path, redistill, setting):
    from rich.console import Console

    from stillhouse.common.config import RedistillSettings, Settings
    from stillhouse.rollout.distill.pipeline import redistill as run

    settings = Settings(state_dir=tmp_path, redistill=RedistillSettings(**redistill))
    with pytest.raises(UsageError, match=f"^{setting} is not set: point it at ") as info:
        run(settings, Console(quiet=True))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "demo").exists()  # production never builds the demo world


def test_a_teacher_directory_without_a_model_is_refused(tmp_path):
    from stillhouse.common.config import DataSettings, RedistillSettings, Settings, TeacherSettings
    from stillhouse.rollout.distill.pipeline import required_inputs

    rs = RedistillSettings(
        data=DataSettings(source=tmp_path / "p.jsonl"), teacher=TeacherSettings(model=str(tmp_path))
    )
    with pytest.raises(UsageError, match=r"no config\.json"):
        required_inputs(Settings(state_dir=tmp_path, redistill=rs))
    (tmp_path / "config.json").write_text("{}")
    assert required_inputs(Settings(state_dir=tmp_path, redistill=rs)) == (
        tmp_path / "p.jsonl",
        tmp_path,
    )


def test_the_config_hash_is_how_the_student_trains_not_where_its_inputs_live(tmp_path):
    from stillhouse.common.config import (
        DataSettings,
        RedistillSettings,
        Settings,
        TeacherSettings,
        TrainingSettings,
    )
    from stillhouse.rollout.distill.pipeline import config_hash

    def chash(**redistill) -> str:
        return config_hash(Settings(redistill=RedistillSettings(**redistill)), "fp")

    unset = chash()
    assert chash(data=DataSettings(source=tmp_path / "a.jsonl")) == unset
    assert chash(teacher=TeacherSettings(model="/models/teacher")) == unset
    assert chash(data=DataSettings(max_prompts=99)) != unset
    assert chash(training=TrainingSettings(epochs=2)) != unset
    assert chash(sft_baseline=False) == unset  # reporting only
    assert config_hash(Settings(), "other teacher") != unset
