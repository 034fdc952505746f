"""Turn tickets into supervised examples for the demo teacher: triage and judge tasks.

An example is token ids plus labels, with -100 on the prompt so the loss only covers the
assistant's answer (and its `<|end|>`, so the model learns to stop).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from stillhouse.common.prompts import (
    judge_user_message,
    judge_verdict,
    pairwise_user_message,
    pairwise_verdict,
    render_verdict,
    triage_answer,
    triage_user_message,
)
from stillhouse.demo.corpus import CATEGORIES, PRIORITIES, Ticket, reference_reply

IGNORE_INDEX = -100


@dataclass(frozen=True)
class JudgeItem:
    """A (ticket, candidate answer) pair with its ground-truth verdict."""

    ticket: Ticket
    candidate: str
    candidate_category: str
    candidate_priority: str
    verdict: dict[str, object]


@dataclass(frozen=True)
class PairwiseItem:
    """Two candidate answers to one ticket, in the order shown, with the ground-truth winner."""

    ticket: Ticket
    answer_a: str
    answer_b: str
    verdict: dict[str, str]


def triage_messages(ticket: Ticket) -> list[dict[str, str]]:
    return [{"role": "user", "content": triage_user_message(ticket.text)}]


def reference_answer(ticket: Ticket) -> str:
    reply = reference_reply(ticket.category, ticket.priority)
    return triage_answer(ticket.category, ticket.priority, reply)


def make_judge_item(ticket: Ticket, rng: random.Random, wrong_share: float = 0.6) -> JudgeItem:
    """A candidate answer that is right, or wrong in category, priority or both."""
    category, priority = ticket.category, ticket.priority
    if rng.random() < wrong_share:
        mode = rng.randrange(3)
        if mode in (0, 2):
            category = rng.choice([c for c in CATEGORIES if c != ticket.category])
        if mode in (1, 2):
            priority = rng.choice([p for p in PRIORITIES if p != ticket.priority])
    candidate = triage_answer(category, priority, reference_reply(category, priority))
    verdict = judge_verdict(ticket.category, ticket.priority, category, priority, PRIORITIES)
    return JudgeItem(ticket, candidate, category, priority, verdict)


def judge_messages(item: JudgeItem) -> list[dict[str, str]]:
    return [{"role": "user", "content": judge_user_message(item.ticket.text, item.candidate)}]


def make_pairwise_item(ticket: Ticket, rng: random.Random) -> PairwiseItem:
    """Two independently corrupted candidates (each wrong half the time): every outcome, ties
    included, in random order so the judge cannot learn a position."""
    a = make_judge_item(ticket, rng, wrong_share=0.5)
    b = make_judge_item(ticket, rng, wrong_share=0.5)
    return PairwiseItem(ticket, a.candidate, b.candidate, pairwise_verdict(a.verdict, b.verdict))


def pairwise_messages(item: PairwiseItem) -> list[dict[str, str]]:
    content = pairwise_user_message(item.ticket.text, item.answer_a, item.answer_b)
    return [{"role": "user", "content": content}]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], answer: str
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a chat prompt followed by the assistant's answer and `<|end|>`."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = list(prompt_ids) + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return input_ids, labels


def build_training_examples(
    tokenizer: PreTrainedTokenizerBase,
    tickets: list[Ticket],
    judge_share: float,
    seed: int,
    pairwise_share: float = 0.0,
) -> list[tuple[list[int], list[int]]]:
    """Every ticket as a triage example, plus `judge_share` of them as judge examples and
    `pairwise_share` as pairwise judge examples."""
    rng = random.Random(seed)
    examples = [encode_example(tokenizer, triage_messages(t), reference_answer(t)) for t in tickets]
    for t in tickets:
        if rng.random() < judge_share:
            item = make_judge_item(t, rng)
            examples.append(
                encode_example(tokenizer, judge_messages(item), render_verdict(item.verdict))
            )
    # A second pass with its own stream, so adding pairwise examples leaves the others as they
    # were for the same seed.
    pair_rng = random.Random(seed + 1)
    for t in tickets:
        if pair_rng.random() < pairwise_share:
            pair = make_pairwise_item(t, pair_rng)
            examples.append(
                encode_example(tokenizer, pairwise_messages(pair), render_verdict(pair.verdict))
            )
    return examples
