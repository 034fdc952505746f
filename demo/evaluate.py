"""Score the demo teacher (or any model in the demo format) against the corpus's ground truth.

Scoring is pure: given tickets and the model's raw outputs, count what is right. Getting the
outputs is I/O: `complete_prompts` sends chat-rendered prompts to an OpenAI-compatible server
(vLLM) in batches through the official `openai` client, greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from openai import OpenAI
from transformers import PreTrainedTokenizerBase

from stillhouse.common.prompts import parse_pairwise_verdict, parse_triage_answer, parse_verdict
from stillhouse.demo.corpus import Ticket
from stillhouse.demo.examples import (
    JudgeItem,
    PairwiseItem,
    judge_messages,
    pairwise_messages,
    triage_messages,
)

TRIAGE_MAX_TOKENS = 48
JUDGE_MAX_TOKENS = 40
PAIRWISE_MAX_TOKENS = 96


@dataclass(frozen=True)
class TriageScore:
    n: int
    parsed: float
    category_accuracy: float
    priority_accuracy: float
    hard_n: int
    hard_category_accuracy: float
    hard_priority_accuracy: float
    # (category, priority) accuracy per hard tag: where the misses are
    by_tag: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class JudgeScore:
    n: int
    parsed: float  # share of verdicts that parse as strict JSON
    exact_agreement: float  # score equals the ground-truth score
    correct_agreement: float  # "fully correct (5)" vs "not" matches ground truth


@dataclass(frozen=True)
class PairwiseScore:
    """One order only (the eval judge asks both orders); agreement counts pairs where neither
    the truth nor the judge says tie, as MT-Bench reports it."""

    n: int
    parsed: float
    agreement: float  # winner equals the truth's, all pairs (ties included)
    agreement_without_ties: float
    non_tie_pairs: int


def _ratio(hits: int, n: int) -> float:
    return hits / n if n else 0.0


def score_triage(tickets: Sequence[Ticket], outputs: Sequence[str]) -> TriageScore:
    if len(tickets) != len(outputs):
        raise ValueError("one output per ticket")
    cat = pri = parsed = hard_n = hard_cat = hard_pri = 0
    per_tag: dict[str, list[int]] = {}
    for ticket, out in zip(tickets, outputs, strict=True):
        answer = parse_triage_answer(out)
        ok_c = answer is not None and answer.category == ticket.category
        ok_p = answer is not None and answer.priority == ticket.priority
        parsed += answer is not None
        cat += ok_c
        pri += ok_p
        if ticket.hard:
            hard_n += 1
            hard_cat += ok_c
            hard_pri += ok_p
        for tag in ticket.tags:
            counts = per_tag.setdefault(tag, [0, 0, 0])
            counts[0] += 1
            counts[1] += ok_c
            counts[2] += ok_p
    n = len(tickets)
    return TriageScore(
        n=n,
        parsed=_ratio(parsed, n),
        category_accuracy=_ratio(cat, n),
        priority_accuracy=_ratio(pri, n),
        hard_n=hard_n,
        hard_category_accuracy=_ratio(hard_cat, hard_n),
        hard_priority_accuracy=_ratio(hard_pri, hard_n),
        by_tag={t: (_ratio(c, n), _ratio(p, n)) for t, (n, c, p) in sorted(per_tag.items())},
    )


def score_judge(items: Sequence[JudgeItem], outputs: Sequence[str]) -> JudgeScore:
    if len(items) != len(outputs):
        raise ValueError("one output per judge item")
    parsed = exact = correct = 0
    for item, out in zip(items, outputs, strict=True):
        verdict = parse_verdict(out)
        if verdict is None:
            continue
        parsed += 1
        exact += verdict["score"] == item.verdict["score"]
        correct += (verdict["score"] == 5) == (item.verdict["score"] == 5)
    n = len(items)
    return JudgeScore(n, _ratio(parsed, n), _ratio(exact, n), _ratio(correct, n))


def score_pairwise(items: Sequence[PairwiseItem], outputs: Sequence[str]) -> PairwiseScore:
    if len(items) != len(outputs):
        raise ValueError("one output per pairwise item")
    parsed = agree = non_tie = non_tie_agree = 0
    for item, out in zip(items, outputs, strict=True):
        verdict = parse_pairwise_verdict(out)
        if verdict is None:
            continue
        parsed += 1
        truth, said = item.verdict["winner"], verdict["winner"]
        agree += truth == said
        if "tie" not in (truth, said):
            non_tie += 1
            non_tie_agree += truth == said
    n = len(items)
    return PairwiseScore(
        n, _ratio(parsed, n), _ratio(agree, n), _ratio(non_tie_agree, non_tie), non_tie
    )


def complete_prompts(
    client: OpenAI,
    model: str,
    prompts: Sequence[str],
    max_tokens: int,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions for rendered prompts, in order; `on_batch(n_done)` reports progress."""
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        response = client.completions.create(
            model=model, prompt=batch, max_tokens=max_tokens, temperature=0.0
        )
        texts = [""] * len(batch)
        for choice in response.choices:
            texts[choice.index] = choice.text
        outputs.extend(texts)
        if on_batch is not None:
            on_batch(len(outputs))
    return outputs


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[list[dict[str, str]]]
) -> list[str]:
    return [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        for m in conversations
    ]


def evaluate_served_model(
    client: OpenAI,
    model: str,
    tokenizer: PreTrainedTokenizerBase,
    tickets: Sequence[Ticket],
    judge_items: Sequence[JudgeItem],
    pairwise_items: Sequence[PairwiseItem] = (),
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[TriageScore, JudgeScore, PairwiseScore]:
    """Ask a served model every test ticket and judge item; score each against ground truth."""
    triage_prompts = render_prompts(tokenizer, [triage_messages(t) for t in tickets])
    judge_prompts = render_prompts(tokenizer, [judge_messages(i) for i in judge_items])
    pair_prompts = render_prompts(tokenizer, [pairwise_messages(i) for i in pairwise_items])
    total = len(triage_prompts) + len(judge_prompts) + len(pair_prompts)

    def report(offset: int) -> Callable[[int], None]:
        return lambda done: on_progress(offset + done, total) if on_progress else None

    triage_out = complete_prompts(
        client, model, triage_prompts, TRIAGE_MAX_TOKENS, on_batch=report(0)
    )
    judge_out = complete_prompts(
        client, model, judge_prompts, JUDGE_MAX_TOKENS, on_batch=report(len(triage_prompts))
    )
    pair_out = complete_prompts(
        client,
        model,
        pair_prompts,
        PAIRWISE_MAX_TOKENS,
        on_batch=report(len(triage_prompts) + len(judge_prompts)),
    )
    return (
        score_triage(tickets, triage_out),
        score_judge(judge_items, judge_out),
        score_pairwise(pairwise_items, pair_out),
    )
