"""Judging traffic: a sample of each arm's answered requests, graded by the LLM judge (single
answer) and compared with the teacher's answer to the same prompt (pairwise, both orders).

    selection = select_for_judging(settings, window, per_arm=100)
    result = judge_selection(settings, selection, endpoints, truth)   # stored for `ab`

Used by `stillhouse judge` and by the rollout gates. A fallback is a tie with the teacher at
no cost; a mirrored answer that would have fallen back is judged as one. Details:
docs/evaluation.md.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from openai import APIError, AsyncOpenAI

from stillhouse.common.config import Settings
from stillhouse.common.roles import STUDENT_ROLES, Role
from stillhouse.common.traffic import MIRROR, TrafficRecord
from stillhouse.eval.judge import Judge, JudgeConfig, JudgeStats, PairwiseJudgment
from stillhouse.eval.judge_templates import (
    DemoJudgeTemplate,
    JudgeTemplate,
    RubricJudgeTemplate,
    ticket_from_logged_prompt,
)
from stillhouse.eval.store import EvalStore, StoredJudgment
from stillhouse.eval.window import Window, read_window

# The served answer is "a", the teacher's reference "b": the served answer's outcome.
_OUTCOME = {"a": "win", "b": "loss", "tie": "tie"}
REFERENCE_MAX_TOKENS = 64


class GroundTruth(Protocol):
    """What a judge should have said, where it is known (the demo world); None elsewhere."""

    def score(self, question: str, answer: str) -> int | None: ...

    def outcome(self, question: str, answer: str, reference: str) -> str | None: ...


@dataclass(frozen=True)
class Agreement:
    """The judge against ground truth. Pairwise agreement leaves out pairs where the truth or
    the judge says tie (as MT-Bench reports agreement "without tie")."""

    single_n: int = 0
    single_exact: float | None = None  # the judge's score equals the true score
    single_correct: float | None = None  # "fully correct (5)" or not, as the truth says
    pairwise_n: int = 0
    pairwise_with_ties: float | None = None
    non_tie_n: int = 0
    non_tie: float | None = None


@dataclass
class JudgingResult:
    judge_model: str
    template_version: str
    judged: list[StoredJudgment] = field(default_factory=list)
    stats: JudgeStats = field(default_factory=JudgeStats)
    skipped_already_judged: int = 0
    references_failed: int = 0
    agreement: Agreement = field(default_factory=Agreement)


def make_template(settings: Settings) -> JudgeTemplate:
    judge = settings.evaluation.judge
    return DemoJudgeTemplate() if judge.template == "demo" else RubricJudgeTemplate(judge.rubric)


def judge_config(settings: Settings, base_url: str) -> JudgeConfig:
    j = settings.evaluation.judge
    return JudgeConfig(
        base_url=base_url,
        model=j.model,
        api_key_env=j.api_key_env,
        concurrency=j.concurrency,
        timeout_s=j.timeout_s,
        max_parse_retries=j.max_parse_retries,
        max_tokens=j.max_tokens,
        structured_output=j.structured_output,
        cache_path=settings.state_dir / "judge-cache.db",
    )


def question_of(record: TrafficRecord, template: JudgeTemplate) -> str | None:
    """What the judge is shown as the question: the ticket text for the demo template, the last
    user message (or the completions prompt) otherwise."""
    if isinstance(template, DemoJudgeTemplate):
        return ticket_from_logged_prompt(record.prompt)
    if not record.prompt:
        return None
    try:
        messages = json.loads(record.prompt)
    except json.JSONDecodeError:
        return record.prompt
    if isinstance(messages, str):
        return messages
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else None


def select_sample(
    records: Sequence[TrafficRecord], per_arm: int, skip: set[str], seed: int = 0
) -> dict[str, list[TrafficRecord]]:
    """Up to `per_arm` answered requests per arm, not in `skip`, drawn at random (seeded) so a
    sample is not just the window's first minutes."""
    rng = random.Random(seed)
    sample: dict[str, list[TrafficRecord]] = {}
    for arm in STUDENT_ROLES:
        pool = [
            r
            for r in records
            if r.arm == arm
            and r.status == 200
            and r.answer
            and r.prompt
            and r.request_id not in skip
        ]
        sample[arm] = sorted(rng.sample(pool, min(per_arm, len(pool))), key=lambda r: r.ts)
    return sample


async def fetch_references(
    base_url: str,
    model: str,
    records: Sequence[TrafficRecord],
    concurrency: int,
    api_key: str = "unused",
) -> dict[str, str]:
    """The teacher's answer to each record's prompt (greedy); a failed call is left out."""
    sem = asyncio.Semaphore(concurrency)
    answers: dict[str, str] = {}
    async with AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=2, timeout=120) as c:

        async def one(record: TrafficRecord) -> None:
            assert record.prompt is not None
            async with sem:
                try:
                    if record.endpoint == "chat":
                        out = await c.chat.completions.create(
                            model=model,
                            messages=json.loads(record.prompt),
                            max_tokens=REFERENCE_MAX_TOKENS,
                            temperature=0.0,
                        )
                        text = out.choices[0].message.content
                    else:
                        done = await c.completions.create(
                            model=model,
                            prompt=json.loads(record.prompt),
                            max_tokens=REFERENCE_MAX_TOKENS,
                            temperature=0.0,
                        )
                        text = done.choices[0].text
                except (APIError, json.JSONDecodeError):
                    return
            if text:
                answers[record.request_id] = text

        await asyncio.gather(*(one(r) for r in records))
    return answers


def _stored(
    record: TrafficRecord, kind: str, judge_model: str, version: str, status: str, **extra: object
) -> StoredJudgment:
    return StoredJudgment(
        request_id=record.request_id,
        kind=kind,
        arm=record.arm,
        served_by=record.served_by,
        student_model=record.student_model,
        judge_model=judge_model,
        template_version=version,
        ts=record.ts,
        status=status,
        **extra,  # type: ignore[arg-type]
    )


def agreement_of(judged: Sequence[StoredJudgment]) -> Agreement:
    single = [j for j in judged if j.kind == "single" and j.status == "ok" and j.truth]
    pairs = [j for j in judged if j.kind == "pairwise" and j.status == "ok" and j.truth]
    non_tie = [j for j in pairs if "tie" not in (j.truth, j.outcome)]

    def share(hits: int, n: int) -> float | None:
        return hits / n if n else None

    return Agreement(
        single_n=len(single),
        single_exact=share(sum(str(j.score) == j.truth for j in single), len(single)),
        single_correct=share(sum((j.score == 5) == (j.truth == "5") for j in single), len(single)),
        pairwise_n=len(pairs),
        pairwise_with_ties=share(sum(j.outcome == j.truth for j in pairs), len(pairs)),
        non_tie_n=len(non_tie),
        non_tie=share(sum(j.outcome == j.truth for j in non_tie), len(non_tie)),
    )


def would_fall_back(record: TrafficRecord) -> bool:
    """A mirrored challenger answer the gateway would not have served (low confidence)."""
    return record.served_by == MIRROR and record.status < 400 and record.fallback_reason is not None


@dataclass(frozen=True)
class _Plan:
    """What one judging run asks: every record's question, the answer the user received (or
    would have), the discarded student answers to grade too, and the pairs to compare."""

    records: list[TrafficRecord]
    questions: dict[str, str | None]
    references: dict[str, str]
    fell_back: set[str]
    pair_records: list[TrafficRecord]
    replaced: list[TrafficRecord]
    received: dict[str, str]
    discarded: dict[str, str]

    @property
    def calls(self) -> int:
        return len(self.records) + len(self.pair_records) + len(self.replaced)


async def _plan(
    settings: Settings,
    sample: Mapping[str, Sequence[TrafficRecord]],
    template: JudgeTemplate,
    reference_url: str | None,
    reference_model: str,
    result: JudgingResult,
) -> _Plan:
    records = [r for arm in STUDENT_ROLES for r in sample.get(arm, ())]
    questions = {r.request_id: question_of(r, template) for r in records}
    records = [r for r in records if questions[r.request_id]]
    references: dict[str, str] = {}
    if settings.evaluation.judge.pairwise and reference_url is not None:
        ask = [r for r in records if r.served_by != Role.TEACHER]
        references = await fetch_references(
            reference_url,
            reference_model,
            ask,
            settings.evaluation.judge.concurrency,
            settings.engine.key or "unused",  # the teacher is one of our engines: its key
        )
        result.references_failed = len(ask) - len(references)
    # A mirrored challenger answer that would have fallen back is judged as what the user would
    # have received, like a real fallback: the teacher's answer, a tie against it, and the
    # discarded answer graded as the student's. Judging it raw would count against the
    # challenger answers the gateway would never have served.
    fell_back = {r.request_id for r in records if would_fall_back(r)}
    records = [r for r in records if r.request_id not in fell_back or r.request_id in references]
    pair_records = [
        r for r in records if r.request_id in references and r.request_id not in fell_back
    ]
    # A fallback's discarded student answer is graded too: quality against confidence (the
    # report's curve, threshold calibration) needs the student's score on every request.
    replaced = [
        r
        for r in records
        if (r.served_by == Role.TEACHER and r.student_answer) or r.request_id in fell_back
    ]
    received = {
        r.request_id: (references[r.request_id] if r.request_id in fell_back else r.answer) or ""
        for r in records
    }
    discarded = {
        r.request_id: (r.answer if r.request_id in fell_back else r.student_answer) or ""
        for r in replaced
    }
    return _Plan(
        records, questions, references, fell_back, pair_records, replaced, received, discarded
    )


async def judge_sample(
    settings: Settings,
    sample: Mapping[str, Sequence[TrafficRecord]],
    judge_url: str,
    reference_url: str | None,
    reference_model: str,
    truth: GroundTruth | None = None,
    on_done: Callable[[int, int], None] | None = None,
) -> JudgingResult:
    """Judge every sampled record (single, and pairwise against the teacher's answer)."""
    template = make_template(settings)
    config = judge_config(settings, judge_url)
    result = JudgingResult(config.model, template.version)
    plan = await _plan(settings, sample, template, reference_url, reference_model, result)
    done = 0

    def tick(*_: object) -> None:
        nonlocal done
        done += 1
        if on_done is not None:
            on_done(done, plan.calls)

    q = plan.questions
    async with Judge(config, template) as judge:
        singles, students, pairs = await asyncio.gather(
            judge.grade_many(
                [(q[r.request_id] or "", plan.received[r.request_id]) for r in plan.records], tick
            ),
            judge.grade_many(
                [(q[r.request_id] or "", plan.discarded[r.request_id]) for r in plan.replaced],
                tick,
            ),
            judge.compare_many(
                [
                    (q[r.request_id] or "", r.answer or "", plan.references[r.request_id])
                    for r in plan.pair_records
                ],
                tick,
            ),
        )
        result.stats = judge.stats
    row = _Rows(config.model, template.version, truth, plan)
    result.judged += row.graded("single", plan.records, singles, plan.received)
    result.judged += row.graded("student", plan.replaced, students, plan.discarded)
    result.judged += [row.pair(r, pair) for r, pair in zip(plan.pair_records, pairs, strict=True)]
    if settings.evaluation.judge.pairwise and reference_url is not None:
        result.judged += row.teacher_ties()
    result.agreement = agreement_of(result.judged)
    return result


@dataclass(frozen=True)
class _Rows:
    """Turns verdicts into stored judgments, with the ground truth where it is known."""

    judge_model: str
    version: str
    truth: GroundTruth | None
    plan: _Plan

    def _question(self, record: TrafficRecord) -> str:
        return self.plan.questions[record.request_id] or ""

    def graded(
        self,
        kind: str,
        records: Sequence[TrafficRecord],
        verdicts: Sequence[Any],
        texts: Mapping[str, str],
    ) -> list[StoredJudgment]:
        rows = []
        for record, verdict in zip(records, verdicts, strict=True):
            text = texts[record.request_id]
            true = self.truth.score(self._question(record), text) if self.truth else None
            rows.append(
                _stored(
                    record,
                    kind,
                    self.judge_model,
                    self.version,
                    verdict.status,
                    score=verdict.score,
                    truth=None if true is None else str(true),
                )
            )
        return rows

    def pair(self, record: TrafficRecord, pair: PairwiseJudgment) -> StoredJudgment:
        reference = self.plan.references[record.request_id]
        true = (
            self.truth.outcome(self._question(record), record.answer or "", reference)
            if self.truth
            else None
        )
        outcome = _OUTCOME[pair.outcome] if pair.outcome is not None else None
        return _stored(
            record,
            "pairwise",
            self.judge_model,
            self.version,
            pair.status,
            outcome=outcome,
            truth=true,
        )

    def teacher_ties(self) -> list[StoredJudgment]:
        """What the user got (or would have got) is the teacher's answer: a tie, no call."""
        rows = []
        for record in self.plan.records:
            if record.served_by == Role.TEACHER or record.request_id in self.plan.fell_back:
                answer = self.plan.received[record.request_id]
                q = self._question(record)
                true = self.truth.outcome(q, answer, answer) if self.truth else None
                rows.append(
                    _stored(
                        record,
                        "pairwise",
                        self.judge_model,
                        self.version,
                        "ok",
                        outcome="tie",
                        truth=true,
                    )
                )
        return rows


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def judge_summary_rows(result: JudgingResult) -> list[dict[str, object]]:
    """One row per arm: what this run judged and what the judge said."""
    rows = []
    for arm in STUDENT_ROLES:
        mine = [j for j in result.judged if j.arm == arm]
        single = [j for j in mine if j.kind == "single"]
        pairs = [j for j in mine if j.kind == "pairwise"]
        ok_scores = [float(j.score) for j in single if j.status == "ok" and j.score]
        outcomes = [j.outcome for j in pairs if j.status == "ok"]
        rows.append(
            {
                "arm": arm,
                "judged": len(single),
                "mean_score": _mean(ok_scores),
                "wins": outcomes.count("win"),
                "ties": outcomes.count("tie"),
                "losses": outcomes.count("loss"),
                "unparseable": sum(j.status == "unparseable" for j in mine),
                "errors": sum(j.status == "error" for j in mine),
            }
        )
    return rows


def judge_metrics(result: JudgingResult) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in judge_summary_rows(result):
        arm = row["arm"]
        for key in ("judged", "mean_score", "wins", "ties", "losses", "unparseable", "errors"):
            value = row[key]
            if isinstance(value, int | float):
                out[f"{arm}.{key}"] = float(value)
    s = result.stats
    out.update(
        calls=s.calls,
        cache_hits=s.cache_hits,
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens,
        parse_retries=s.parse_retries,
        unparseable=s.unparseable,
        errors=s.errors,
    )
    a = result.agreement
    for key in ("single_exact", "single_correct", "pairwise_with_ties", "non_tie"):
        value = getattr(a, key)
        if value is not None:
            out[f"agreement.{key}"] = value
    return out


@dataclass(frozen=True)
class JudgeEndpoints:
    judge_url: str
    reference_url: str | None  # the teacher, for pairwise references; None: no pairwise
    reference_model: str


@dataclass(frozen=True)
class JudgeSelection:
    """What one judging run takes from a window: up to `per_arm` requests per arm that this
    judge and template have not judged before."""

    window_records: int
    chosen: dict[str, list[TrafficRecord]]
    judged_before: int

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.chosen.values())


def select_for_judging(settings: Settings, window: Window, per_arm: int) -> JudgeSelection:
    records = read_window(settings.traffic_log_path, window)
    template = make_template(settings)
    with EvalStore(settings.eval_db_path) as store:
        done = store.judged_ids("single", settings.evaluation.judge.model, template.version)
    return JudgeSelection(len(records), select_sample(records, per_arm, done), len(done))


def judge_selection(
    settings: Settings,
    selection: JudgeSelection,
    endpoints: JudgeEndpoints,
    truth: GroundTruth | None = None,
    on_done: Callable[[int, int], None] | None = None,
) -> JudgingResult:
    """Judge the selection and store the judgments (`stillhouse ab` and the gates read them)."""
    result = asyncio.run(
        judge_sample(
            settings,
            selection.chosen,
            endpoints.judge_url,
            endpoints.reference_url,
            endpoints.reference_model,
            truth,
            on_done,
        )
    )
    with EvalStore(settings.eval_db_path) as store:
        store.save_judgments(result.judged)
    return result
