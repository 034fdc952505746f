"""What the LLM judge is asked and how its replies are read: chat messages, JSON schemas, strict
parsers. Pure functions and plain data; the HTTP side lives in `stillhouse.eval.judge`.

Two templates ship:

- `DemoJudgeTemplate`: the demo teacher's own judge formats (`common/prompts.py`), so the judge
  path runs on the model the demo world trains; the question is the ticket text.
- `RubricJudgeTemplate`: a generic prompt for a real instruct judge, with a caller's 1–5 rubric.

A template's `version` goes into the judge cache's key. It is derived from the rendered
messages (with placeholders) and the schemas, so editing a prompt format, the rubric or a schema
invalidates cached verdicts without anyone remembering to bump a number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from stillhouse.common.chat import Messages
from stillhouse.common.prompts import (
    TRIAGE_INSTRUCTION,
    judge_user_message,
    pairwise_user_message,
)

SCORES = (1, 2, 3, 4, 5)
WINNERS = ("a", "b", "tie")
# A generation guard for grammar engines (a weak model otherwise rambles until max_tokens runs
# out); the parser does not re-check it, since engines count string length in different units.
REASON_MAX_CHARS = 200

SINGLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        # an enum, not minimum/maximum: grammar engines constrain enums token by token
        "score": {"type": "integer", "enum": list(SCORES)},
        "reason": {"type": "string", "maxLength": REASON_MAX_CHARS},
    },
    "required": ["score", "reason"],
    "additionalProperties": False,
}
PAIRWISE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": list(WINNERS)},
        "reason": {"type": "string", "maxLength": REASON_MAX_CHARS},
    },
    "required": ["winner", "reason"],
    "additionalProperties": False,
}


# The demo teacher writes its pairwise reasoning (a grade for each answer) before the winner:
# the same fields in the order it learned, so a grammar engine generates them that way.
DEMO_PAIRWISE_SCHEMA: dict[str, Any] = {
    **PAIRWISE_SCHEMA,
    "properties": {
        "reason": PAIRWISE_SCHEMA["properties"]["reason"],
        "winner": PAIRWISE_SCHEMA["properties"]["winner"],
    },
    "required": ["reason", "winner"],
}


@dataclass(frozen=True)
class SingleVerdict:
    score: int
    reason: str


@dataclass(frozen=True)
class PairwiseVerdict:
    winner: str  # "a" | "b" | "tie", in the order the answers were shown
    reason: str


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def _json_object(text: str | None, keys: set[str]) -> dict[str, Any] | None:
    """The reply as a JSON object with exactly `keys` (no extra, none missing, no duplicate)."""
    if not isinstance(text, str):
        return None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, _DuplicateKeyError, RecursionError):
        return None
    if not isinstance(obj, dict) or set(obj) != keys:
        return None
    return obj


def parse_single(text: str | None) -> SingleVerdict | None:
    """A strict parse of `{"score": 1..5, "reason": str}`: None for anything else (extra or
    missing fields, a float or boolean score, a score out of range, a non-string reason)."""
    obj = _json_object(text, {"score", "reason"})
    if obj is None:
        return None
    score, reason = obj["score"], obj["reason"]
    if isinstance(score, bool) or not isinstance(score, int) or score not in SCORES:
        return None
    if not isinstance(reason, str):
        return None
    return SingleVerdict(score, reason)


def parse_pairwise(text: str | None) -> PairwiseVerdict | None:
    """A strict parse of `{"winner": "a" | "b" | "tie", "reason": str}`; None otherwise."""
    obj = _json_object(text, {"winner", "reason"})
    if obj is None:
        return None
    winner, reason = obj["winner"], obj["reason"]
    if not isinstance(winner, str) or winner not in WINNERS or not isinstance(reason, str):
        return None
    return PairwiseVerdict(winner, reason)


def _fingerprint(*parts: object) -> str:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class JudgeTemplate:
    """Turns (question, answer) or (question, answer_a, answer_b) into chat messages, and reads
    the reply. Subclasses provide the two message builders and a `name`."""

    name = "template"
    single_schema: dict[str, Any] = SINGLE_SCHEMA
    pairwise_schema: dict[str, Any] = PAIRWISE_SCHEMA
    # Whether a vLLM judge should be started with whitespace-free JSON forced (see
    # `stillhouse.eval.judge.judge_engine_args`): a guard against weak models padding the JSON,
    # harmful for a model that learned one spaced JSON style.
    compact_json = True

    def single_messages(self, question: str, answer: str) -> Messages:
        raise NotImplementedError

    def pairwise_messages(self, question: str, answer_a: str, answer_b: str) -> Messages:
        raise NotImplementedError

    def parse_single(self, text: str | None) -> SingleVerdict | None:
        return parse_single(text)

    def parse_pairwise(self, text: str | None) -> PairwiseVerdict | None:
        return parse_pairwise(text)

    @property
    def version(self) -> str:
        """`<name>-<hash of the rendered formats and schemas>`: part of the cache key."""
        rendered = (
            self.single_messages("{question}", "{answer}"),
            self.pairwise_messages("{question}", "{answer_a}", "{answer_b}"),
            self.single_schema,
            self.pairwise_schema,
        )
        return f"{self.name}-{_fingerprint(*rendered)}"


@dataclass(frozen=True)
class DemoJudgeTemplate(JudgeTemplate):
    """The demo teacher's judge formats; `question` is the ticket text (see the helpers below
    to get it from a triage message or a traffic-log prompt)."""

    name = "demo"
    # The demo teacher learned `render_verdict`'s `{"score": 5, "reason": "..."}`; forced
    # compact JSON puts it off its training distribution (measured on the demo teacher, 60 test
    # tickets: exact score agreement 30 -> 13, reasons 26 -> 0 right), and it never pads.
    compact_json = False
    pairwise_schema = DEMO_PAIRWISE_SCHEMA

    def single_messages(self, question: str, answer: str) -> Messages:
        return [{"role": "user", "content": judge_user_message(question, answer)}]

    def pairwise_messages(self, question: str, answer_a: str, answer_b: str) -> Messages:
        return [{"role": "user", "content": pairwise_user_message(question, answer_a, answer_b)}]


GENERIC_RUBRIC = """\
5: fully correct, complete and directly useful; nothing important missing or wrong.
4: correct and useful, with a minor omission or imprecision.
3: partly correct; a noticeable error or gap, but still of some use.
2: mostly wrong or unhelpful, with a small correct part.
1: wrong, irrelevant, harmful or empty."""

_SINGLE_SYSTEM = """\
You are an impartial judge. Grade the answer to the user's question with this rubric:
{rubric}
Reply with only a JSON object: {{"score": <integer 1-5>, "reason": "<one short sentence>"}}."""

_PAIRWISE_SYSTEM = """\
You are an impartial judge. Compare two answers, a and b, to the same question, using this \
rubric as the measure of quality:
{rubric}
Judge content only: ignore the order of the answers and their length. Say "tie" when they are \
equally good.
Reply with only a JSON object: \
{{"winner": "a" | "b" | "tie", "reason": "<one short sentence>"}}."""


@dataclass(frozen=True)
class RubricJudgeTemplate(JudgeTemplate):
    """A generic template for a real instruct judge: the rubric (1–5) goes in the system prompt;
    `name` lets two rubrics' caches be told apart at a glance (the version hashes the text)."""

    rubric: str = GENERIC_RUBRIC
    name: str = "rubric"

    def __post_init__(self) -> None:
        if not self.rubric.strip():
            raise ValueError("the rubric must not be empty")

    def single_messages(self, question: str, answer: str) -> Messages:
        return [
            {"role": "system", "content": _SINGLE_SYSTEM.format(rubric=self.rubric)},
            {"role": "user", "content": f"[question]\n{question}\n\n[answer]\n{answer}"},
        ]

    def pairwise_messages(self, question: str, answer_a: str, answer_b: str) -> Messages:
        content = f"[question]\n{question}\n\n[answer a]\n{answer_a}\n\n[answer b]\n{answer_b}"
        return [
            {"role": "system", "content": _PAIRWISE_SYSTEM.format(rubric=self.rubric)},
            {"role": "user", "content": content},
        ]


_TRIAGE_PREFIX = f"{TRIAGE_INSTRUCTION}\nticket: "


def ticket_from_triage_message(content: str) -> str | None:
    """The ticket text of a triage user message (`common.prompts.triage_user_message`), or None
    when the message is not one. Text after a special-token marker (`<|...`) is cut off, so a
    chat-rendered completions prompt works too."""
    start = content.find(_TRIAGE_PREFIX)
    if start < 0:
        return None
    text = content[start + len(_TRIAGE_PREFIX) :]
    marker = text.find("<|")
    return text[:marker] if marker >= 0 else text


def ticket_from_logged_prompt(prompt: str | None) -> str | None:
    """The ticket text of a traffic-log prompt: the JSON text of the chat messages (the last
    user message is the triage message), or a completions prompt string. None when there is no
    triage ticket in it."""
    if not prompt:
        return None
    try:
        messages = json.loads(prompt)
    except json.JSONDecodeError:
        return ticket_from_triage_message(prompt)
    if not isinstance(messages, list):
        return ticket_from_triage_message(prompt) if isinstance(messages, str) else None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return ticket_from_triage_message(content) if isinstance(content, str) else None
    return None
