"""Ground truth for the demo's evaluation: every demo ticket's category and priority are known,
so each judge verdict can be checked against what it should have said.

The judge sees the ticket text (extracted from the triage prompt); this maps that text back to
its ticket and grades an answer with the same rubric the demo judge was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable

from stillhouse.common.config import Settings
from stillhouse.common.prompts import judge_verdict, pairwise_verdict, parse_triage_answer
from stillhouse.demo.build import load_demo_world
from stillhouse.demo.corpus import PRIORITIES, Ticket

# pairwise_verdict's winner ("a" = the served answer, "b" = the reference) as the served
# answer's outcome
_OUTCOME = {"a": "win", "b": "loss", "tie": "tie"}


class DemoTruth:
    """`score(question, answer)` and `outcome(question, answer, reference)` by the demo rubric;
    None for a question that is not a demo ticket."""

    def __init__(self, tickets: Iterable[Ticket]) -> None:
        self._by_text = {t.text: t for t in tickets}

    def _verdict(self, ticket: Ticket, answer: str) -> dict[str, object]:
        parsed = parse_triage_answer(answer)
        if parsed is None:  # not even in the answer format: as wrong as an answer gets
            return {"score": 1, "reason": "not a triage answer"}
        return judge_verdict(
            ticket.category, ticket.priority, parsed.category, parsed.priority, PRIORITIES
        )

    def score(self, question: str, answer: str) -> int | None:
        ticket = self._by_text.get(question)
        if ticket is None:
            return None
        return int(self._verdict(ticket, answer)["score"])  # type: ignore[call-overload]

    def outcome(self, question: str, answer: str, reference: str) -> str | None:
        ticket = self._by_text.get(question)
        if ticket is None:
            return None
        verdict = pairwise_verdict(self._verdict(ticket, answer), self._verdict(ticket, reference))
        return _OUTCOME[verdict["winner"]]


def demo_truth(settings: Settings) -> DemoTruth | None:
    """The demo world's ground truth when the judge uses the demo template and a world is
    built; None otherwise (the judge's agreement is then not reported)."""
    if settings.evaluation.judge.template != "demo" or not settings.demo.enabled:
        return None
    world = load_demo_world(settings.demo_dir)
    if world is None:
        return None
    return DemoTruth(t for split in ("train", "val", "test") for t in world.split(split))
