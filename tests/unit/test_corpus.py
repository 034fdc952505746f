from collections import Counter

import pytest

from stillhouse.demo.corpus import (
    CATEGORIES,
    HARD_TAGS,
    ISSUES,
    PRIORITIES,
    CorpusSpec,
    Ticket,
    generate_corpus,
    read_jsonl,
    write_jsonl,
)

SPEC = CorpusSpec(seed=7, n_train=1800, n_val=360, n_test=360)


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(SPEC)


def test_same_seed_gives_the_same_corpus(corpus):
    again = generate_corpus(SPEC)
    assert [t.to_json() for t in again["train"]] == [t.to_json() for t in corpus["train"]]


def test_another_seed_gives_another_corpus(corpus):
    other = generate_corpus(CorpusSpec(seed=8, n_train=1800, n_val=360, n_test=360))
    assert {t.text for t in other["test"]} != {t.text for t in corpus["test"]}


def test_splits_have_the_requested_sizes_and_share_no_ticket(corpus):
    assert {k: len(v) for k, v in corpus.items()} == {"train": 1800, "val": 360, "test": 360}
    texts = {name: {t.text for t in tickets} for name, tickets in corpus.items()}
    assert len(texts["train"]) == 1800  # no duplicate inside a split either
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["val"]
    assert not texts["val"] & texts["test"]
    ids = [t.id for tickets in corpus.values() for t in tickets]
    assert len(ids) == len(set(ids))


def test_labels_are_balanced(corpus):
    for tickets in corpus.values():
        cats = Counter(t.category for t in tickets)
        prios = Counter(t.priority for t in tickets)
        assert set(cats) == set(CATEGORIES) and set(prios) == set(PRIORITIES)
        assert max(cats.values()) - min(cats.values()) <= 1
        assert max(prios.values()) - min(prios.values()) <= 1


def test_every_hard_kind_appears_in_every_split_at_the_specified_share(corpus):
    for name, tickets in corpus.items():
        tags = Counter(tag for t in tickets for tag in t.tags)
        assert set(tags) == set(HARD_TAGS), name
    # "rare_phrase" tags also tickets that used a rare phrase by chance, so the share is a floor
    share = {k: sum(t.hard for t in v) / len(v) for k, v in corpus.items()}
    assert SPEC.train_hard_share - 0.05 < share["train"] < SPEC.train_hard_share + 0.1
    assert SPEC.eval_hard_share - 0.05 < share["test"] < SPEC.eval_hard_share + 0.1


def _keyword_guess(text: str) -> str | None:
    """The naive baseline: the first category name (or its stem) that the ticket mentions."""
    stems = {"billing": "bill", "shipping": "ship", "account": "account", "technical": "error",
             "returns": "return", "cancellation": "cancel"}  # fmt: skip
    lowered = text.lower()
    hits = [(lowered.find(s), c) for c, s in stems.items() if s in lowered]
    return min(hits)[1] if hits else None


def test_one_keyword_does_not_solve_the_corpus(corpus):
    test = corpus["test"]
    accuracy = sum(_keyword_guess(t.text) == t.category for t in test) / len(test)
    assert accuracy < 0.6, accuracy


def test_negation_makes_urgent_a_low_priority_cue(corpus):
    not_urgent = [t for t in corpus["train"] if "not urgent" in t.text.lower()]
    assert not_urgent and all(t.priority == "low" for t in not_urgent)


def _phrase_count(tickets, phrase: str) -> int:
    stem = phrase.split("{")[0].strip()[:22]  # typo-free prefix is enough to recognise it
    return sum(stem in t.text.lower() for t in tickets)


def test_rare_phrases_are_rare_in_training_but_present(corpus):
    train = corpus["train"]
    rare = [_phrase_count(train, p) for c in ISSUES.values() for p in c["rare"]]
    common = [_phrase_count(train, p) for c in ISSUES.values() for p in c["common"]]
    assert min(rare) >= 1, "every rare phrase is seen at least once in training"
    assert sum(rare) / len(rare) < 0.2 * sum(common) / len(common)


def test_rare_phrase_tickets_are_tagged_wherever_they_occur(corpus):
    stems = [p.split("{")[0].strip()[:22] for c in ISSUES.values() for p in c["rare"]]
    for t in corpus["test"]:
        if any(s in t.text.lower() for s in stems):
            assert "rare_phrase" in t.tags, t.text


def test_jsonl_round_trip(tmp_path, corpus):
    path = tmp_path / "test.jsonl"
    write_jsonl(corpus["test"], path)
    back = read_jsonl(path)
    assert back == corpus["test"]
    assert isinstance(back[0], Ticket)


def test_spec_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="n_train"):
        CorpusSpec(n_train=3)
    with pytest.raises(ValueError, match="eval_hard_share"):
        CorpusSpec(eval_hard_share=1.5)
