"""`make demo`: the loop so far, on the demo world, from nothing to an A/B verdict and a report.

    stillhouse demo run

1. Build the demo world (corpus, tokenizer, teacher; cached) and score the teacher on vLLM.
2. Distill two students from it and register them: last week's (champion) and this week's
   (challenger). Cached in the registry: a second run trains nothing.
3. Serve teacher, champion and challenger on vLLM behind the gateway (`stillhouse serve` as a
   child process), with a share of users on the challenger and every student answer scored by
   the teacher in the shadow path.
4. Drive synthetic tickets from many users through the gateway with the `openai` client.
5. Evaluate that traffic: check the judge on labelled pairs, judge a sample of each arm,
   compute divergence and drift, and the A/B statistics and verdict.
6. Write the HTML report (and log everything to MLflow).

Every engine and the gateway are stopped at the end, whatever happens.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack
from datetime import UTC, datetime

from rich.console import Console

from stillhouse.common.config import EngineRef, Settings
from stillhouse.common.tracking import RunTracker
from stillhouse.eval.judge import judge_engine_args
from stillhouse.eval.judge_job import make_template
from stillhouse.rollout import eval_jobs
from stillhouse.rollout.demo.build import DemoWorld, build_demo_world, ensure_teacher_evaluated
from stillhouse.rollout.demo.gateway_process import GatewayProcess, engine_overrides
from stillhouse.rollout.demo.judge_check import AGREEMENT_BAR, check_judge
from stillhouse.rollout.demo.report import print_build_summary
from stillhouse.rollout.demo.students import ensure_demo_students
from stillhouse.rollout.demo.traffic import drive_tickets
from stillhouse.serving.serve import resolve_engines, start_engines

STEPS = 6
CHALLENGER_SHARE = 0.3
SHADOW_FRACTION = 1.0  # every student answer: the drift detector needs the records
CONCURRENCY = 8


def _step(console: Console, n: int, title: str) -> None:
    console.rule(f"[bold]step {n}/{STEPS}: {title}")


def demo_tickets(world: DemoWorld) -> list:
    """Held-out tickets only (never trained on): the validation and test splits."""
    return world.split("test") + world.split("val")


def run_demo(settings: Settings, console: Console) -> DemoWorld:
    started = time.monotonic()
    _step(console, 1, "the demo world")
    world = build_demo_world(settings, console=console)
    ensure_teacher_evaluated(world, settings, console)
    print_build_summary(world, console)

    _step(console, 2, "students: last week's (champion) and this week's (challenger)")
    students = ensure_demo_students(settings, console)

    _step(console, 3, "serving: teacher, champion and challenger behind the gateway")
    refs = {
        # The teacher also judges once traffic stops, with what its judge template needs.
        "teacher": EngineRef(
            model=str(world.teacher_dir),
            served_name="teacher",
            extra_args=judge_engine_args(make_template(settings)),
        ),
        "champion": EngineRef(model=students.champion.uri, served_name="champion"),
        "challenger": EngineRef(model=students.challenger.uri, served_name="challenger"),
    }
    engines = resolve_engines(refs, settings)
    with ExitStack() as stack:
        endpoints = start_engines(engines, settings, stack, console)
        env = {
            **engine_overrides(engines, {r: e.base_url for r, e in endpoints.items()}),
            "STILLHOUSE_GATEWAY__AB__CHALLENGER_SHARE": str(CHALLENGER_SHARE),
            "STILLHOUSE_GATEWAY__SHADOW__FRACTION": str(SHADOW_FRACTION),
            "STILLHOUSE_STATE_DIR": str(settings.state_dir),
        }
        gateway = GatewayProcess(env, settings.logs_dir / "demo-gateway.log")
        stack.callback(gateway.stop)
        with console.status("starting the gateway"):
            gateway.start()
        console.print(
            f"gateway at {gateway.url}/v1: {CHALLENGER_SHARE:.0%} of users on the challenger, "
            f"{SHADOW_FRACTION:.0%} of student answers shadow-scored by the teacher; "
            f"traffic log {settings.traffic_log_path}"
        )

        _step(console, 4, "traffic")
        tickets = demo_tickets(world)
        window_start = datetime.now(UTC)
        tally = _drive(gateway.url, tickets, console)
        console.print(
            f"{tally.sent} tickets in {tally.seconds:.0f} s ({tally.sent / tally.seconds:.1f}/s), "
            f"{tally.failed} failed; arms: {dict(tally.by_arm)}; served by: "
            f"{dict(tally.by_served)}; fallbacks: {dict(tally.fallbacks) or 'none'}"
        )
        for error in tally.errors:
            console.print(f"  failed request: {error}", markup=False)
        gateway.stop()  # flushes the traffic log; the teacher keeps running to judge
        since = window_start.isoformat()

        _step(console, 5, "evaluation: judge, divergence and drift, A/B")
        teacher_url = endpoints["teacher"].base_url
        check = check_judge(settings, world, teacher_url)
        verdict = "meets" if (check.agreement_non_tie or 0) >= AGREEMENT_BAR else "misses"
        console.print(
            f"judge check on {check.pairs} labelled pairs (both orders): agrees with the "
            f"ground truth on {_pct1(check.agreement_non_tie)} of the {check.non_tie} pairs where "
            f"neither says tie ({verdict} the {AGREEMENT_BAR:.0%} bar); names the better answer "
            f"in {_pct(check.recall)} of the {check.truth_non_tie} pairs that have one; "
            f"order-consistent on {_pct(check.position_consistent)}; "
            f"{check.stats.unparseable} unparseable"
        )
        _log_judge_check(settings, check)
        endpoints_for_judge = eval_jobs.JudgeEndpoints(teacher_url, teacher_url, "teacher")
        eval_jobs.run_judge(settings, console, since=since, endpoints=endpoints_for_judge)
        eval_jobs.run_drift(settings, console, since=since)
        eval_jobs.run_ab(settings, console, since=since)

        _step(console, 6, "report")
        path = eval_jobs.run_report(settings, console, since=since)
    console.print(f"report: [bold]{path}[/]")
    console.print(
        f"demo done in {time.monotonic() - started:.0f} s; every engine and the gateway are "
        "stopped. Next: `stillhouse ab --since 1h`, `stillhouse report`, or `stillhouse serve`."
    )
    return world


def _drive(url: str, tickets: list, console: Console):
    from stillhouse.common.progress import progress_bar

    with progress_bar(console) as progress:
        task = progress.add_task("tickets", total=len(tickets), info="")
        return asyncio.run(
            drive_tickets(
                f"{url}/v1", "unused", "stillhouse", tickets, concurrency=CONCURRENCY,
                on_done=lambda n: progress.update(task, completed=n),
            )
        )  # fmt: skip


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _pct1(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _log_judge_check(settings: Settings, check) -> None:
    from stillhouse.common.registry import RegistryClient

    tracker = RunTracker(RegistryClient.from_settings(settings), settings.mlflow.experiment)
    with tracker.run("judge-check", {"stillhouse.job": "judge-check"}) as run:
        run.log_metrics({
            "pairs": check.pairs, "non_tie": check.non_tie,
            "agreement_non_tie": check.agreement_non_tie or float("nan"),
            "agreement_with_ties": check.agreement_with_ties or float("nan"),
            "position_consistent": check.position_consistent or float("nan"),
            "recall": check.recall or float("nan"),
            "unparseable": check.stats.unparseable,
        })  # fmt: skip
