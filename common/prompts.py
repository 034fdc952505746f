"""The demo world's task formats, shared by training (rollout, demo) and evaluation (eval).

    triage:   a ticket → category: billing / priority: high / reply: ...  (`triage_answer`)
    judge:    a ticket and an answer → {"score": 1-5, "reason": ...}       (`judge_verdict`)
    pairwise: a ticket and answers a, b → {"reason": ..., "winner": "a" | "b" | "tie"}

All go through the tokenizer's chat template, so vLLM sees exactly the trained text. A raw
completions prompt ends with `category:` and the answer starts with ` billing` (a trailing space
would be a token the model never saw).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

TRIAGE_INSTRUCTION = "triage this support ticket."
JUDGE_INSTRUCTION = "grade this answer to a support ticket."
PAIRWISE_INSTRUCTION = "compare two answers to a support ticket."
WINNERS = ("a", "b", "tie")

_ANSWER_RE = re.compile(
    r"^\s*category:\s*(?P<category>[a-z]+)\s*\n\s*priority:\s*(?P<priority>[a-z]+)\s*"
    r"(?:\n\s*reply:\s*(?P<reply>.*))?$",
    re.DOTALL,
)


@dataclass(frozen=True)
class TriageAnswer:
    category: str
    priority: str
    reply: str


def triage_user_message(ticket_text: str) -> str:
    return f"{TRIAGE_INSTRUCTION}\nticket: {ticket_text}"


def triage_answer(category: str, priority: str, reply: str) -> str:
    return f"category: {category}\npriority: {priority}\nreply: {reply}"


def parse_triage_answer(text: str) -> TriageAnswer | None:
    """The answer's fields, or None when the text is not in the triage format."""
    m = _ANSWER_RE.match(text)
    if m is None:
        return None
    return TriageAnswer(m["category"], m["priority"], (m["reply"] or "").strip())


def judge_user_message(ticket_text: str, candidate_answer: str) -> str:
    return f"{JUDGE_INSTRUCTION}\nticket: {ticket_text}\nanswer:\n{candidate_answer}"


def judge_verdict(
    true_category: str,
    true_priority: str,
    category: str,
    priority: str,
    priorities: tuple[str, ...],
) -> dict[str, object]:
    """The ground-truth verdict for a candidate: 5 both right, 4/3 category right and priority
    one/two levels off, 2 category wrong but priority right, 1 both wrong."""
    cat_ok = category == true_category
    prio_ok = priority == true_priority
    if cat_ok and prio_ok:
        return {"score": 5, "reason": "category and priority are correct"}
    if cat_ok:
        known = priority in priorities
        off = abs(priorities.index(priority) - priorities.index(true_priority)) if known else 2
        return {"score": 4 if off == 1 else 3, "reason": f"priority should be {true_priority}"}
    if prio_ok:
        return {"score": 2, "reason": f"category should be {true_category}"}
    return {
        "score": 1,
        "reason": f"category should be {true_category} and priority should be {true_priority}",
    }


def render_verdict(verdict: dict[str, object]) -> str:
    return json.dumps(verdict, separators=(", ", ": "))


def parse_verdict(text: str) -> dict[str, object] | None:
    """A strict parse: a JSON object with an integer score 1..5 and a string reason."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(obj, dict):
        return None
    score, reason = obj.get("score"), obj.get("reason")
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
        return None
    if not isinstance(reason, str):
        return None
    return {"score": score, "reason": reason}


def pairwise_user_message(ticket_text: str, answer_a: str, answer_b: str) -> str:
    return (
        f"{PAIRWISE_INSTRUCTION}\nticket: {ticket_text}\n"
        f"answer a:\n{answer_a}\nanswer b:\n{answer_b}"
    )


def pairwise_verdict(verdict_a: dict[str, object], verdict_b: dict[str, object]) -> dict[str, str]:
    """The ground-truth comparison of two graded answers: the higher rubric score wins.

    The reason comes first and grades each answer (its score and why): a judge that writes its
    reasoning before its verdict decides from what it just wrote, as MT-Bench's pairwise prompt
    asks for an explanation before the verdict. Key order matters for generation only; the
    parser accepts either."""
    score_a, score_b = int(verdict_a["score"]), int(verdict_b["score"])  # type: ignore[call-overload]
    reason = (
        f"a scores {score_a} ({verdict_a['reason']}); b scores {score_b} ({verdict_b['reason']})"
    )
    winner = "tie" if score_a == score_b else "a" if score_a > score_b else "b"
    return {"reason": reason, "winner": winner}


def parse_pairwise_verdict(text: str) -> dict[str, str] | None:
    """A strict parse: a JSON object with `winner` in a / b / tie and a string `reason`."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(obj, dict):
        return None
    winner, reason = obj.get("winner"), obj.get("reason")
    if winner not in WINNERS or not isinstance(reason, str):
        return None
    return {"winner": winner, "reason": reason}
