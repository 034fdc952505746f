"""The evaluation commands: read a window of the traffic log, evaluate, print, log to MLflow.

    stillhouse judge [--since 2h] [--sample 100]
    stillhouse drift [--since 2h]
    stillhouse ab    [--since 2h]
    stillhouse report [--since 2h] [--out report.html]

The computations live in `stillhouse.eval` (the rollout controller's gates call the same
ones); this module adds what a command does around them: which judge endpoint, the terminal
tables, the Prometheus text files, and one MLflow run per command.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from stillhouse.cli.context import completed_settings, settings_of
from stillhouse.common.config import Settings

if TYPE_CHECKING:
    from stillhouse.common.tracking import RunTracker
    from stillhouse.eval.ab_summary import AbSummary
    from stillhouse.eval.judging import GroundTruth, JudgeEndpoints, JudgingResult
    from stillhouse.eval.student_drift import StudentDrift
    from stillhouse.eval.window import Window

SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="Window start: a duration back from now (30m, 2h, 7d) or an ISO time "
        "(default: evaluation.window_hours).",
    ),
]


def register(app: typer.Typer) -> None:
    for command in (judge, drift, ab, report):
        app.command()(command)


def judge(
    ctx: typer.Context,
    since: SinceOption = None,
    sample: Annotated[
        int | None,
        typer.Option(min=1, help="Requests per arm (default: evaluation.judge.sample_per_arm)."),
    ] = None,
) -> None:
    """Judge a sample of each arm's answers with the LLM judge (single and pairwise)."""
    from stillhouse.demo.truth import demo_truth

    console = Console()
    settings = settings_of(ctx)
    if settings.evaluation.judge.base_url is None:  # the teacher judges
        settings = completed_settings(ctx, {"teacher"}, console)
    run_judge(settings, console, since=since, sample=sample, truth=demo_truth(settings))


def drift(ctx: typer.Context, since: SinceOption = None) -> None:
    """Student-teacher divergence per student and whether it drifted from its reference."""
    run_drift(settings_of(ctx), Console(), since=since)


def ab(ctx: typer.Context, since: SinceOption = None) -> None:
    """The A/B test: per-arm quality, fallbacks, latency, cost, SRM check and the verdict."""
    run_ab(settings_of(ctx), Console(), since=since)


def report(
    ctx: typer.Context,
    since: SinceOption = None,
    out: Annotated[
        Path | None, typer.Option(help="HTML file (default: <state_dir>/reports/...).")
    ] = None,
) -> None:
    """One self-contained HTML report with plots, also logged to MLflow."""
    path = run_report(settings_of(ctx), Console(), since=since, out=out)
    Console().print(f"report: {path}")


def window_for(settings: Settings, since: str | None) -> Window:
    from stillhouse.eval.window import make_window

    return make_window(since, settings.evaluation.window_hours)


def _tracker(settings: Settings) -> RunTracker:
    from stillhouse.common.registry import RegistryClient
    from stillhouse.common.tracking import RunTracker

    return RunTracker(RegistryClient.from_settings(settings), settings.mlflow.experiment)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _metrics_path(settings: Settings, command: str) -> Path:
    return settings.metrics_dir / f"{command}.prom"


@contextmanager
def judge_endpoints(settings: Settings, console: Console) -> Iterator[JudgeEndpoints]:
    """The configured judge, or else the teacher (`gateway.engines.teacher`), which then also
    gives the pairwise references: a running one is asked where it is, a model is started on
    vLLM for the command. A configured judge takes its references from a running teacher, if
    there is one."""
    from stillhouse.eval.judging import JudgeEndpoints

    judge = settings.evaluation.judge
    teacher = settings.gateway.engines.teacher
    if judge.base_url is not None:
        reference = teacher.base_url if teacher is not None else None
        name = (teacher.served_name if teacher else None) or "teacher"
        yield JudgeEndpoints(judge.base_url, reference, name)
        return
    if teacher is None:
        from stillhouse.common.errors import UsageError

        raise UsageError(
            "no judge: set evaluation.judge.base_url, or gateway.engines.teacher (it judges)"
        )
    if teacher.base_url is not None:
        name = teacher.served_name or "teacher"
        yield JudgeEndpoints(teacher.base_url, teacher.base_url, name)
        return
    from stillhouse.eval.judge import judge_engine_args
    from stillhouse.eval.judging import make_template
    from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine
    from stillhouse.serving.serve import resolve_engine

    resolved = resolve_engine("teacher", teacher, settings, None)  # type: ignore[arg-type]
    assert resolved is not None and resolved.model_dir is not None
    args = judge_engine_args(make_template(settings))
    spec = EngineSpec(resolved.model_dir, judge.model, None, args)
    engine = VllmEngine(spec, settings.engine, settings.logs_dir)
    try:
        with console.status(f"starting the judge (the teacher) on vLLM; log {engine.log_path}"):
            engine.start()
            engine.wait_ready()
        yield JudgeEndpoints(engine.base_url, engine.base_url, judge.model)
    finally:
        engine.stop()


# ---- judge ---------------------------------------------------------------------------------


def run_judge(
    settings: Settings,
    console: Console,
    *,
    since: str | None = None,
    sample: int | None = None,
    truth: GroundTruth | None = None,
) -> JudgingResult:
    """`stillhouse judge`; `truth` (the demo's ground truth) adds the judge's agreement."""
    from stillhouse.cli.evaluation_tables import judge_lines, judge_table
    from stillhouse.common.progress import progress_bar
    from stillhouse.eval.judging import judge_metrics, judge_selection, select_for_judging

    window = window_for(settings, since)
    per_arm = sample or settings.evaluation.judge.sample_per_arm
    selection = select_for_judging(settings, window, per_arm)
    arms = ", ".join(f"{a} {len(v)}" for a, v in selection.chosen.items())
    console.print(
        f"judging {selection.size} requests ({arms}) of {selection.window_records} in "
        f"{window.label}; {selection.judged_before} judged before are skipped"
    )
    with progress_bar(console) as progress, judge_endpoints(settings, console) as endpoints:
        task = progress.add_task("judging", total=None, info="")

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = judge_selection(settings, selection, endpoints, truth, tick)
    console.print(judge_table(result))
    for line in judge_lines(result):
        console.print(line)
    with _tracker(settings).run(f"judge-{_stamp()}", {"stillhouse.job": "judge"}) as run:
        run.log_params(
            {
                "window": window.label,
                "sample_per_arm": str(per_arm),
                "judge_model": settings.evaluation.judge.model,
                "template_version": result.template_version,
                "pairwise": str(settings.evaluation.judge.pairwise),
            }
        )
        run.log_metrics(judge_metrics(result))
        run.log_table([_judgment_row(j) for j in result.judged], "judgments.json")
    return result


def _judgment_row(j: Any) -> dict[str, object]:
    return {
        "request_id": j.request_id,
        "kind": j.kind,
        "arm": j.arm,
        "served_by": j.served_by,
        "student_model": j.student_model,
        "status": j.status,
        "score": j.score,
        "outcome": j.outcome,
        "truth": j.truth,
    }


# ---- A/B -----------------------------------------------------------------------------------


def run_ab(settings: Settings, console: Console, *, since: str | None = None) -> AbSummary:
    """`stillhouse ab`."""
    from stillhouse.cli.evaluation_tables import ab_tables, srm_line
    from stillhouse.eval.ab_summary import ab_metrics, ab_summary_for_window, verdict_row
    from stillhouse.eval.metrics import write_ab_metrics

    window = window_for(settings, since)
    summary, _, _ = ab_summary_for_window(settings, window)
    for table in ab_tables(summary):
        console.print(table)
    console.print(srm_line(summary))
    verdicts = (
        ("judge score", summary.judge_verdict),
        ("pairwise vs teacher", summary.pairwise_verdict),
    )
    for label, verdict in verdicts:
        console.print(f"verdict on {label}: [bold]{verdict.verdict}[/] ({verdict.reason})")
    for note in summary.notes:
        console.print(f"note: {note}")
    console.print(f"gauges: {write_ab_metrics(summary, _metrics_path(settings, 'ab'))}")
    with _tracker(settings).run(f"ab-{_stamp()}", {"stillhouse.job": "ab"}) as run:
        run.log_params(
            {
                "window": window.label,
                "alpha": str(settings.evaluation.ab.alpha),
                "effect_of_interest": str(settings.evaluation.ab.effect_of_interest),
                "judge_model": summary.judge_model or "",
            }
        )
        run.log_metrics(ab_metrics(summary))
        run.log_table([verdict_row(label, v) for label, v in verdicts], "ab_verdicts.json")
    return summary


# ---- drift ---------------------------------------------------------------------------------


def run_drift(
    settings: Settings, console: Console, *, since: str | None = None
) -> list[StudentDrift]:
    """`stillhouse drift`."""
    from stillhouse.cli.evaluation_tables import drift_table
    from stillhouse.eval.metrics import write_drift_metrics
    from stillhouse.eval.student_drift import drift_for_window, drift_metrics, drift_rows

    window = window_for(settings, since)
    ds = settings.evaluation.drift
    results = drift_for_window(settings, window)
    if not results:
        console.print(
            f"no shadow records in {window.label}: nothing to measure (is "
            "gateway.shadow.fraction > 0?)"
        )
    console.print(drift_table(results, window.label))
    for r in results:
        reasons = "; ".join(r.assessment.reasons) if r.assessment else r.note
        extra = f" ({reasons})" if reasons else ""
        console.print(f"{r.arm} ({r.student_model}): [bold]{r.state}[/]{extra}")
    metrics_file = write_drift_metrics(results, _metrics_path(settings, "drift"))
    with _tracker(settings).run(f"drift-{_stamp()}", {"stillhouse.job": "drift"}) as run:
        run.log_params(
            {
                "window": window.label,
                "reference_size": str(ds.reference_size),
                "false_alarm_rate": str(ds.false_alarm_rate),
                "signal": "k3 per request",
            }
        )
        run.log_metrics(drift_metrics(results))
        run.set_tags({f"drift_state.{r.arm}": r.state for r in results})
        run.log_table(drift_rows(results), "drift.json")
    console.print(f"gauges: {metrics_file}", highlight=False)
    return results


# ---- report --------------------------------------------------------------------------------


def run_report(
    settings: Settings, console: Console, *, since: str | None = None, out: Path | None = None
) -> Path:
    """`stillhouse report`: the HTML page, also logged to MLflow; returns its path."""
    from stillhouse.eval.ab_summary import ab_summary_for_window
    from stillhouse.eval.report import write_report
    from stillhouse.eval.report_data import build_report_data
    from stillhouse.eval.student_drift import drift_for_window

    window = window_for(settings, since)
    ab, records, judgments = ab_summary_for_window(settings, window)
    drift = drift_for_window(settings, window)
    with console.status("rendering the report"):
        data = build_report_data(
            ab,
            drift,
            records,
            judgments,
            settings.gateway.confidence.threshold,
            notes=[f"traffic log {settings.traffic_log_path}", f"{len(records)} requests"],
        )
        path = out or settings.state_dir / "reports" / f"report-{_stamp()}.html"
        write_report(data, path)
    with _tracker(settings).run(f"report-{_stamp()}", {"stillhouse.job": "report"}) as run:
        run.log_params({"window": window.label})
        run.log_artifact(path)
    return path.resolve()
