"""How far to trust the judge: its pairwise verdicts on labelled pairs against ground truth.

Demo tickets with two candidate answers each (right, or wrong in category, priority or both),
judged exactly as `stillhouse judge` judges traffic: both orders, a win only when both agree.
Agreement counts the pairs where neither the truth nor the judge says tie (MT-Bench's
"agreement without tie"); the demo's bar is 85 %.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from stillhouse.common.config import Settings
from stillhouse.demo.build import DemoWorld
from stillhouse.demo.examples import make_pairwise_item
from stillhouse.eval.judge import Judge, JudgeStats
from stillhouse.eval.judging import judge_config, make_template

AGREEMENT_BAR = 0.85


@dataclass(frozen=True)
class JudgeCheck:
    pairs: int
    judged: int  # parsed in both orders
    non_tie: int
    agreement_non_tie: float | None
    agreement_with_ties: float | None
    position_consistent: float | None  # both orders named the same answer or both said tie
    stats: JudgeStats
    # Of the pairs that have a better answer, the share where the judge named it: agreement on
    # non-tie pairs alone would praise a judge that says "tie" to everything but one pair.
    truth_non_tie: int = 0
    recall: float | None = None


async def _check(settings: Settings, judge_url: str, items: list) -> JudgeCheck:
    config = judge_config(settings, judge_url)
    async with Judge(config, make_template(settings)) as judge:
        out = await judge.compare_many([(i.ticket.text, i.answer_a, i.answer_b) for i in items])
        stats = judge.stats
    ok = [(i, j) for i, j in zip(items, out, strict=True) if j.status == "ok"]
    non_tie = [(i, j) for i, j in ok if "tie" not in (i.verdict["winner"], j.outcome)]
    agree = sum(i.verdict["winner"] == j.outcome for i, j in non_tie)
    consistent = sum(j.first == j.second for _, j in ok)
    decided = [(i, j) for i, j in ok if i.verdict["winner"] != "tie"]
    found = sum(i.verdict["winner"] == j.outcome for i, j in decided)
    return JudgeCheck(
        pairs=len(items),
        judged=len(ok),
        non_tie=len(non_tie),
        agreement_non_tie=agree / len(non_tie) if non_tie else None,
        agreement_with_ties=(
            sum(i.verdict["winner"] == j.outcome for i, j in ok) / len(ok) if ok else None
        ),
        position_consistent=consistent / len(ok) if ok else None,
        stats=stats,
        truth_non_tie=len(decided),
        recall=found / len(decided) if decided else None,
    )


def check_judge(settings: Settings, world: DemoWorld, judge_url: str, n: int = 300) -> JudgeCheck:
    """Judge `n` labelled pairs built from the test split (seeded, the same pairs every run, so
    the judge cache makes a rerun free)."""
    rng = random.Random(int(world.manifest["settings"]["seed"]) + 7)
    tickets = world.split("test")
    items = [make_pairwise_item(t, rng) for t in rng.sample(tickets, min(n, len(tickets)))]
    return asyncio.run(_check(settings, judge_url, items))
