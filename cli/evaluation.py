"""The evaluation commands as jobs: read the traffic log, evaluate, print, log to MLflow.

    stillhouse judge [--since 2h] [--sample 100]
    stillhouse drift [--since 2h]
    stillhouse ab    [--since 2h]
    stillhouse report [--since 2h] [--out report.html]

The deciding code lives in `stillhouse.eval` (pure functions over plain data); this module is
the I/O around it: which traffic, which judge endpoint (the configured one, or the demo teacher
started on vLLM for the job), the demo's ground truth when the traffic is demo tickets, and one
MLflow run per job with its parameters, metrics and a table artifact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stillhouse.common.config import Settings
from stillhouse.common.errors import UsageError
from stillhouse.common.formatting import number
from stillhouse.common.progress import progress_bar
from stillhouse.common.registry import RegistryClient
from stillhouse.common.tracking import RunTracker
from stillhouse.common.traffic import TrafficLogReader, TrafficRecord
from stillhouse.eval import ab_summary as ab_job
from stillhouse.eval import judging as judge_job
from stillhouse.eval import student_drift as drift_job
from stillhouse.eval.metrics import write_ab_metrics, write_drift_metrics
from stillhouse.eval.store import EvalStore
from stillhouse.eval.window import Window, make_window


@dataclass(frozen=True)
class JudgeEndpoints:
    judge_url: str
    reference_url: str | None  # the teacher, for pairwise references; None: no pairwise
    reference_model: str


def window_for(settings: Settings, since: str | None) -> Window:
    return make_window(since, settings.evaluation.window_hours)


def read_records(settings: Settings, window: Window) -> list[TrafficRecord]:
    path = settings.traffic_log_path
    if not path.is_file():
        raise UsageError(
            f"no traffic log at {path}: serve traffic first (`stillhouse serve`, or `make demo`)"
        )
    with TrafficLogReader(path) as log:
        return log.records(since=window.since, until=window.until)


def demo_truth(settings: Settings) -> Any:
    """The demo world's ground truth when the judge uses the demo template and a world is
    built; None otherwise (agreement is then not reported)."""
    if settings.evaluation.judge.template != "demo":
        return None
    from stillhouse.demo.build import load_demo_world
    from stillhouse.demo.truth import DemoTruth

    world = load_demo_world(settings.demo_dir)
    if world is None:
        return None
    return DemoTruth(t for split in ("train", "val", "test") for t in world.split(split))


@contextmanager
def judge_endpoints(settings: Settings, console: Console) -> Iterator[JudgeEndpoints]:
    """The configured judge, or the demo teacher served by vLLM for this job (it also gives
    the pairwise reference answers). A configured judge takes its references from a running
    teacher (`gateway.engines.teacher.base_url`), if there is one."""
    judge = settings.evaluation.judge
    teacher = settings.gateway.engines.teacher
    if judge.base_url is not None:
        reference = teacher.base_url if teacher is not None else None
        name = (teacher.served_name if teacher else None) or "teacher"
        yield JudgeEndpoints(judge.base_url, reference, name)
        return
    from stillhouse.demo.build import build_demo_world
    from stillhouse.eval.judge import judge_engine_args
    from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine

    world = build_demo_world(settings, console=console)
    args = judge_engine_args(judge_job.make_template(settings))
    spec = EngineSpec(world.teacher_dir, judge.model, None, args)
    engine = VllmEngine(spec, settings.engine, settings.logs_dir)
    try:
        with console.status(f"starting the judge (demo teacher) on vLLM; log {engine.log_path}"):
            engine.start()
            engine.wait_ready()
        yield JudgeEndpoints(engine.base_url, engine.base_url, judge.model)
    finally:
        engine.stop()


def _tracker(settings: Settings) -> RunTracker:
    return RunTracker(RegistryClient.from_settings(settings), settings.mlflow.experiment)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _table(title: str, rows: Sequence[Mapping[str, object]]) -> Table:
    table = Table(title=title)
    if not rows:
        return table
    for key in rows[0]:
        table.add_column(str(key), justify="left" if key == "arm" else "right")
    for row in rows:
        table.add_row(*(number(v) for v in row.values()))
    return table


# ---- judge ---------------------------------------------------------------------------------


def run_judge(
    settings: Settings,
    console: Console,
    *,
    since: str | None = None,
    sample: int | None = None,
    endpoints: JudgeEndpoints | None = None,
) -> judge_job.JudgeJobResult:
    window = window_for(settings, since)
    records = read_records(settings, window)
    per_arm = sample or settings.evaluation.judge.sample_per_arm
    template = judge_job.make_template(settings)
    model = settings.evaluation.judge.model
    with EvalStore(settings.eval_db_path) as store:
        done = store.judged_ids("single", model, template.version)
        chosen = judge_job.select_sample(records, per_arm, done)
        n = sum(len(v) for v in chosen.values())
        console.print(
            f"judging {n} requests ({', '.join(f'{a} {len(v)}' for a, v in chosen.items())}) "
            f"of {len(records)} in {window.label}; {len(done)} judged before are skipped"
        )
        truth = demo_truth(settings)
        with progress_bar(console) as progress:
            task = progress.add_task("judging", total=None, info="")

            def tick(done_n: int, total: int) -> None:
                progress.update(task, completed=done_n, total=total)

            def judge_with(ep: JudgeEndpoints) -> judge_job.JudgeJobResult:
                return asyncio.run(
                    judge_job.judge_sample(
                        settings, chosen, ep.judge_url, ep.reference_url, ep.reference_model,
                        truth, tick,
                    )
                )  # fmt: skip

            if endpoints is not None:
                result = judge_with(endpoints)
            else:
                with judge_endpoints(settings, console) as ep:
                    result = judge_with(ep)
        store.save_judgments(result.judged)
    print_judge_result(result, console)
    with _tracker(settings).run(f"judge-{_stamp()}", {"stillhouse.job": "judge"}) as run:
        run.log_params({
            "window": window.label, "sample_per_arm": str(per_arm), "judge_model": model,
            "template_version": result.template_version,
            "pairwise": str(settings.evaluation.judge.pairwise),
        })  # fmt: skip
        run.log_metrics(judge_job.judge_metrics(result))
        run.log_table([_judgment_row(j) for j in result.judged], "judgments.json")
    return result


def _judgment_row(j: Any) -> dict[str, object]:
    return {
        "request_id": j.request_id, "kind": j.kind, "arm": j.arm, "served_by": j.served_by,
        "student_model": j.student_model, "status": j.status, "score": j.score,
        "outcome": j.outcome, "truth": j.truth,
    }  # fmt: skip


def print_judge_result(result: judge_job.JudgeJobResult, console: Console) -> None:
    console.print(_table(f"judge: {result.judge_model}", judge_job.judge_summary_rows(result)))
    s = result.stats
    console.print(
        f"judge calls {s.calls} ({s.cache_hits} verdicts from cache), tokens "
        f"{s.prompt_tokens} prompt / {s.completion_tokens} completion; unparseable "
        f"{s.unparseable}, errors {s.errors}, parse retries {s.parse_retries}"
        + (
            f"; {result.references_failed} teacher references failed"
            if result.references_failed
            else ""
        )
    )
    a = result.agreement
    if a.single_n or a.pairwise_n:
        parts = []
        if a.single_exact is not None:
            parts.append(f"score exact {a.single_exact:.0%} of {a.single_n}")
        if a.single_correct is not None:
            parts.append(f"'fully correct' {a.single_correct:.0%}")
        if a.non_tie is not None:
            parts.append(f"pairwise (non-tie) {a.non_tie:.0%} of {a.non_tie_n}")
        if a.pairwise_with_ties is not None:
            parts.append(f"pairwise (ties included) {a.pairwise_with_ties:.0%} of {a.pairwise_n}")
        console.print("judge vs ground truth: " + ", ".join(parts))


# ---- A/B -----------------------------------------------------------------------------------


def compute_ab(settings: Settings, window: Window) -> tuple[ab_job.AbReport, list, list]:
    """The A/B report, with the records and judgments it was built from."""
    records = read_records(settings, window)
    with TrafficLogReader(settings.traffic_log_path) as log:
        changes = log.ab_changes()
    with EvalStore(settings.eval_db_path) as store:
        judgments = store.judgments(
            since=window.since, until=window.until, judge_model=settings.evaluation.judge.model
        )
    report = ab_job.build_ab_report(records, judgments, changes, settings, window.label)
    return report, records, judgments


def run_ab(settings: Settings, console: Console, *, since: str | None = None) -> ab_job.AbReport:
    window = window_for(settings, since)
    report, _, _ = compute_ab(settings, window)
    for table in ab_job.ab_tables(report):
        console.print(table)
    console.print(ab_job.srm_line(report))
    for label, verdict in (("judge score", report.judge_verdict),
                           ("pairwise vs teacher", report.pairwise_verdict)):  # fmt: skip
        console.print(f"verdict on {label}: [bold]{verdict.verdict}[/] ({verdict.reason})")
    for note in report.notes:
        console.print(f"note: {note}")
    console.print(f"gauges: {write_ab_metrics(report, _metrics_path(settings, 'ab'))}")
    with _tracker(settings).run(f"ab-{_stamp()}", {"stillhouse.job": "ab"}) as run:
        run.log_params({
            "window": window.label, "alpha": str(settings.evaluation.ab.alpha),
            "effect_of_interest": str(settings.evaluation.ab.effect_of_interest),
            "judge_model": report.judge_model or "",
        })  # fmt: skip
        run.log_metrics(ab_job.ab_metrics(report))
        run.log_table(
            [ab_job.verdict_row("judge score", report.judge_verdict),
             ab_job.verdict_row("pairwise vs teacher", report.pairwise_verdict)],
            "ab_verdicts.json",
        )  # fmt: skip
    return report


# ---- drift ---------------------------------------------------------------------------------


def _metrics_path(settings: Settings, job: str) -> Path:
    return settings.metrics_dir / f"{job}.prom"


def compute_drift(settings: Settings, window: Window) -> list[drift_job.StudentDrift]:
    ds = settings.evaluation.drift
    path = settings.traffic_log_path
    if not path.is_file():
        raise UsageError(f"no traffic log at {path}: serve traffic first")
    with TrafficLogReader(path) as log:
        current_all = drift_job.divergences(log.shadow(since=window.since, until=window.until))
        records = log.records(since=window.since, until=window.until)
        arms = {r.student_model: r.arm for r in records if r.student_model}
        results = []
        with EvalStore(settings.eval_db_path) as store:
            for student, items in drift_job.by_student(current_all).items():
                ref = store.reference(student)
                in_ref: set[str] = set()
                if ref is not None:
                    reference, source = list(ref.values), ref.source
                else:
                    source = "first-records"
                    # The student's first shadow records ever (not just this window's) fix its
                    # reference once; later runs reuse it from the store.
                    history = [
                        d for d in drift_job.divergences(log.shadow())
                        if d.student_model == student
                    ]  # fmt: skip
                    reference, in_ref = drift_job.split_reference(history, ds.reference_size)
                    if reference is not None:
                        store.set_reference(student, reference, source)
                current = [d for d in items if d.request_id not in in_ref]
                results.append(drift_job.student_drift(
                    student, drift_job.arm_of(student, arms), current, reference, source, ds,
                ))  # fmt: skip
    return results


def drift_table(results: Sequence[drift_job.StudentDrift], window: str) -> Table:
    """The terminal view: the full rows (every test's numbers) go to MLflow."""
    table = Table(title=f"divergence and drift ({window})")
    for col in ("arm", "records", "KL k3 [95% CI]", "top-1", "PSI", "test p", "CUSUM/h",
                "state"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("arm", "state") else "right")
    for r in results:
        d, rep = r.divergence, r.report
        tests = rep.tests if rep else None
        table.add_row(
            r.arm,
            str(d.n if d else 0),
            f"{d.k3_mean:.3f} [{d.k3_ci[0]:.3f}, {d.k3_ci[1]:.3f}]" if d else "–",
            number(d.top1_agreement) if d else "–",
            number(tests.psi) if tests else "–",
            f"{tests.pvalue:.2g}" if tests else "–",
            f"{rep.sequential_statistic:.1f}/{rep.sequential_threshold:.1f}"
            if rep and rep.sequential_statistic is not None and rep.sequential_threshold
            else "–",
            r.state,
        )
    return table


def run_drift(
    settings: Settings, console: Console, *, since: str | None = None
) -> list[drift_job.StudentDrift]:
    window = window_for(settings, since)
    ds = settings.evaluation.drift
    results = compute_drift(settings, window)
    if not results:
        console.print(f"no shadow records in {window.label}: nothing to measure (is "
                      "gateway.shadow.fraction > 0?)")  # fmt: skip
    console.print(drift_table(results, window.label))
    for r in results:
        reasons = "; ".join(r.report.reasons) if r.report else r.note
        console.print(f"{r.arm} ({r.student_model}): [bold]{r.state}[/]" +
                      (f" ({reasons})" if reasons else ""))  # fmt: skip
    metrics_file = write_drift_metrics(results, _metrics_path(settings, "drift"))
    with _tracker(settings).run(f"drift-{_stamp()}", {"stillhouse.job": "drift"}) as run:
        run.log_params({
            "window": window.label, "reference_size": str(ds.reference_size),
            "false_alarm_rate": str(ds.false_alarm_rate), "signal": "k3 per request",
        })  # fmt: skip
        run.log_metrics(drift_job.drift_metrics(results))
        run.set_tags({f"drift_state.{r.arm}": r.state for r in results})
        run.log_table(drift_job.drift_rows(results), "drift.json")
    console.print(f"gauges: {metrics_file}", highlight=False)
    return results


# ---- report --------------------------------------------------------------------------------


def run_report(
    settings: Settings, console: Console, *, since: str | None = None, out: Path | None = None
) -> Path:
    from stillhouse.eval.report import write_report
    from stillhouse.eval.report_data import build_report_data

    window = window_for(settings, since)
    ab, records, judgments = compute_ab(settings, window)
    drift = compute_drift(settings, window)
    with console.status("rendering the report"):
        data = build_report_data(
            ab, drift, records, judgments, settings.gateway.confidence.threshold,
            notes=[f"traffic log {settings.traffic_log_path}", f"{len(records)} requests"],
        )  # fmt: skip
        path = out or settings.state_dir / "reports" / f"report-{_stamp()}.html"
        write_report(data, path)
    with _tracker(settings).run(f"report-{_stamp()}", {"stillhouse.job": "report"}) as run:
        run.log_params({"window": window.label})
        run.log_artifact(path)
    return path.resolve()
