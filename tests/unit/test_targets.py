from types import SimpleNamespace

import pytest

from stillhouse.common.prompts import triage_answer
from stillhouse.rollout.distill.targets import (
    QualityFilter,
    TargetCache,
    TargetRequest,
    TeacherError,
    TeacherTarget,
    answer_without_reasoning,
    filter_targets,
    fingerprint_model_dir,
    parse_choice,
)

GOOD = triage_answer("billing", "high", "we will call.")


def _choice(tokens, tops, text=GOOD, finish="stop"):
    return SimpleNamespace(
        text=text,
        finish_reason=finish,
        index=0,
        logprobs=SimpleNamespace(tokens=tokens, top_logprobs=tops),
    )


def test_choice_becomes_token_ids_and_the_best_k_alternatives():
    tops = [
        {"token_id:5": -0.1, "token_id:7": -2.5, "token_id:9": -3.0},
        # vLLM adds the sampled token when it falls outside the top-k
        {"token_id:4": -0.2, "token_id:8": -1.9, "token_id:3": -4.0},
    ]
    t = parse_choice("k", _choice(["token_id:5", "token_id:3"], tops), top_k=2)
    assert t.token_ids == (5, 3)
    assert t.top_ids == ((5, 7), (4, 8))
    assert t.top_logprobs == ((-0.1, -2.5), (-0.2, -1.9))
    assert t.finish_reason == "stop"


def test_black_box_keeps_no_top_k():
    t = parse_choice("k", _choice(["token_id:5"], [{"token_id:5": -0.1}]), top_k=0)
    assert t.top_ids is None and t.top_logprobs is None


def test_tokens_without_ids_are_a_clear_teacher_error():
    with pytest.raises(TeacherError, match="return_tokens_as_token_ids"):
        parse_choice("k", _choice(["billing"], None), top_k=0)


def test_target_json_round_trip_and_cache(tmp_path):
    t = TeacherTarget("k", GOOD, (1, 2), "stop", ((1, 3),), ((-0.1, -2.0),))
    assert TeacherTarget.from_json(t.to_json()) == t
    cache = TargetCache(tmp_path / "c.sqlite")
    cache.put_many({"a": t})
    cache.close()
    again = TargetCache(tmp_path / "c.sqlite")
    assert again.get_many(["a", "b"]) == {"a": t}


def test_cache_key_changes_with_every_input():
    base = TargetRequest("grey-box", 20, 64, 0.0, "fp")
    keys = {
        base.cache_key("p"),
        base.cache_key("q"),
        TargetRequest("black-box", 20, 64, 0.0, "fp").cache_key("p"),
        TargetRequest("grey-box", 5, 64, 0.0, "fp").cache_key("p"),
        TargetRequest("grey-box", 20, 64, 0.0, "other-teacher").cache_key("p"),
    }
    assert len(keys) == 5


@pytest.mark.parametrize(
    ("text", "ids", "finish", "reason"),
    [
        (GOOD, (1, 2, 3), "stop", None),
        ("", (), "stop", "too_short"),
        (GOOD, tuple(range(100)), "stop", "too_long"),
        (GOOD, (1, 2, 3), "length", "truncated"),
        ("category billing", (1, 2, 3), "stop", "bad_format"),
        ("<think>the order is late</think>\n" + GOOD, (1, 2, 3), "stop", None),
    ],
)
def test_quality_filter_reasons(text, ids, finish, reason):
    f = QualityFilter(min_tokens=2, max_tokens=50)
    kept, dropped = filter_targets({"k": TeacherTarget("k", text, ids, finish)}, f)
    if reason is None:
        assert "k" in kept and not dropped
    else:
        assert not kept and dropped == {reason: 1}


def test_judge_score_filter_drops_low_and_unscored():
    f = QualityFilter(min_judge_score=4)
    targets = {k: TeacherTarget(k, GOOD, (1, 2), "stop") for k in ("a", "b", "c")}
    kept, dropped = filter_targets(targets, f, judge_scores={"a": 5, "b": 2})
    assert set(kept) == {"a"} and dropped == {"low_judge_score": 2}


def test_reasoning_trace_is_kept_in_the_target_but_not_in_the_answer():
    text = "<think>two issues; the cue says billing</think>\n" + GOOD
    assert answer_without_reasoning(text) == GOOD


def test_fingerprint_follows_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a")
    before = fingerprint_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"b")
    assert fingerprint_model_dir(tmp_path) != before
