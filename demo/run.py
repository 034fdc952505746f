"""`make demo`: one compressed weekly cycle on the demo world, from nothing to a promotion, a
rollback, and a report (`stillhouse demo run`).

1. the demo world (cached) and the teacher scored on vLLM; 2. three students distilled and
registered (last week's champion, this week's challenger, a degraded one; cached in the
registry); 3. the teacher on vLLM and the gateway as a child process following the student
aliases, the champion calibrated; 4. the rollout under ticket traffic: this week's student
promoted (hot swap under load), the degraded one rolled back; 5. the judge checked on labelled
pairs; 6. the HTML report. Every engine and the gateway are stopped at the end, whatever happens.
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from rich.console import Console

from stillhouse.common.config import EngineRef, Settings
from stillhouse.common.formatting import percent
from stillhouse.common.registry import RegistryClient, alias_uri
from stillhouse.common.roles import Alias, Role
from stillhouse.common.tracking import RunTracker
from stillhouse.demo import cycle
from stillhouse.demo.build import DemoWorld, build_demo_world, ensure_teacher_evaluated
from stillhouse.demo.defaults import demo_settings
from stillhouse.demo.gateway_process import GatewayProcess
from stillhouse.demo.judge_check import AGREEMENT_BAR, JudgeCheck, check_judge
from stillhouse.demo.students import DemoStudents, ensure_demo_students
from stillhouse.demo.summary import print_build_summary
from stillhouse.demo.traffic import TrafficLoop
from stillhouse.eval.judge import judge_engine_args
from stillhouse.eval.judging import make_template
from stillhouse.rollout.calibration.prompts import calibration_prompts
from stillhouse.rollout.gateway_admin import GatewayAdmin, engine_entry
from stillhouse.serving.engines.pool import engine_notes
from stillhouse.serving.serve import resolve_engine, start_engines

STEPS = 6
SHADOW_FRACTION = 1.0  # every student answer: the drift detector and the gates need records
CONCURRENCY = 8
N_USERS = 400  # enough users that a 5 % step holds about twenty of them
GATEWAY_START_S = 1200.0  # the gateway starts both students' vLLM servers itself


class WriteReport(Protocol):
    """`stillhouse report`'s body: the HTML report of the traffic since `since`, its path."""

    def __call__(self, settings: Settings, console: Console, *, since: str) -> Path: ...


def _step(console: Console, n: int, title: str) -> None:
    console.rule(f"[bold]step {n}/{STEPS}: {title}")


def demo_tickets(world: DemoWorld) -> list:
    """Held-out tickets only (never trained on): the validation and test splits."""
    return world.split("test") + world.split("val")


def gateway_env(settings: Settings, teacher_url: str, admin_key: str) -> dict[str, str]:
    """The gateway child's configuration: the demo's teacher, the students as the registry
    aliases it follows (hot swap), and the compressed demo's shadow and watch settings."""
    name = settings.mlflow.registered_model

    def follow(alias: Alias) -> str:
        return json.dumps({"model": alias_uri(name, alias), "served_name": str(alias)})

    return {
        "STILLHOUSE_GATEWAY__ENGINES__TEACHER": json.dumps(
            {"base_url": teacher_url, "served_name": str(Role.TEACHER)}
        ),
        "STILLHOUSE_GATEWAY__ENGINES__CHAMPION": follow(Alias.CHAMPION),
        "STILLHOUSE_GATEWAY__ENGINES__CHALLENGER": follow(Alias.CHALLENGER),
        "STILLHOUSE_GATEWAY__AB__CHALLENGER_SHARE": "0",  # the controller ramps it
        "STILLHOUSE_GATEWAY__SHADOW__FRACTION": str(SHADOW_FRACTION),
        "STILLHOUSE_GATEWAY__WATCH_INTERVAL_S": "5",
        "STILLHOUSE_STATE_DIR": str(settings.state_dir),
        settings.gateway.admin_key_env: admin_key,
    }


def run_demo(settings: Settings, console: Console, *, write_report: WriteReport) -> DemoWorld:
    """The six steps; `write_report` is `stillhouse report`'s body (the CLI passes it)."""
    started = time.monotonic()
    settings = cycle.demo_rollout_settings(settings)

    _step(console, 1, "the demo world")
    world = build_demo_world(settings, console=console)
    ensure_teacher_evaluated(world, settings, console)
    print_build_summary(world, console)
    settings = demo_settings(settings, world)  # what the config leaves unset, from the world

    _step(console, 2, "students: last week's, this week's, and a degraded one")
    students = ensure_demo_students(settings, console)
    cycle.reset_controller(settings)

    _step(console, 3, "serving: the teacher, and the gateway following the student aliases")
    engine_notes(settings).reap_orphans()  # a demo killed before this one left its engines
    with ExitStack() as stack:
        teacher_url = _serve_teacher(settings, world, stack, console)
        gateway, admin, settings = _start_gateway(settings, teacher_url, stack, console)
        _calibrate_champion(settings, admin, students.champion.version, console)

        _step(console, 4, "the rollout: calibrate, mirror, ramp, promote or roll back")
        window_start = datetime.now(UTC)
        _rollout(settings, admin, gateway.url, world, students, console)

        _step(console, 5, "evaluation: the judge on labelled pairs")
        gateway.stop()  # flushes the traffic log; the teacher keeps running to judge
        _check_the_judge(settings, world, teacher_url, console)

        _step(console, 6, "report")
        path = write_report(settings, console, since=window_start.isoformat())
    console.print(f"report: [bold]{path}[/]")
    console.print(
        f"demo done in {time.monotonic() - started:.0f} s; every engine and the gateway are "
        "stopped. Next: `stillhouse registry list`, `stillhouse report`, or "
        "`stillhouse up --with-prometheus` (the whole loop, watched by Prometheus at "
        "http://127.0.0.1:9090)."
    )
    return world


def _serve_teacher(settings: Settings, world: DemoWorld, stack: ExitStack, console: Console) -> str:
    """The teacher on vLLM until `stack` closes; it also judges, with what its judge template
    needs. Its base URL."""
    teacher_ref = EngineRef(
        model=str(world.teacher_dir),
        served_name=str(Role.TEACHER),
        extra_args=judge_engine_args(make_template(settings)),
    )
    teacher = resolve_engine(Role.TEACHER, teacher_ref, settings, None)  # type: ignore[arg-type]
    assert teacher is not None
    return start_engines({Role.TEACHER: teacher}, settings, stack, console)[Role.TEACHER].base_url


def _start_gateway(
    settings: Settings, teacher_url: str, stack: ExitStack, console: Console
) -> tuple[GatewayProcess, GatewayAdmin, Settings]:
    """`stillhouse serve` as a child process, its admin client, and the settings with the
    controller pointed at it."""
    admin_key = secrets.token_urlsafe(24)
    gateway = GatewayProcess(
        gateway_env(settings, teacher_url, admin_key), settings.logs_dir / "demo-gateway.log"
    )
    stack.callback(gateway.stop)
    with console.status("starting the gateway and the students' vLLM servers"):
        gateway.start(timeout_s=GATEWAY_START_S)
    admin = GatewayAdmin(gateway.url, admin_key)
    stack.callback(admin.close)
    controller = settings.rollout.controller.model_copy(update={"gateway_url": gateway.url})
    rollout = settings.rollout.model_copy(update={"controller": controller})
    console.print(
        f"gateway at {gateway.url}/v1 (log {gateway.log_path}); challenger share 0 until "
        f"the controller ramps it; traffic log {settings.traffic_log_path}"
    )
    return gateway, admin, settings.model_copy(update={"rollout": rollout})


def _check_the_judge(
    settings: Settings, world: DemoWorld, teacher_url: str, console: Console
) -> None:
    check = check_judge(settings, world, teacher_url)
    verdict = "meets" if (check.agreement_non_tie or 0) >= AGREEMENT_BAR else "misses"
    console.print(
        f"judge check on {check.pairs} labelled pairs (both orders): agrees with the ground "
        f"truth on {percent(check.agreement_non_tie)} of the {check.non_tie} pairs where "
        f"neither says tie ({verdict} the {AGREEMENT_BAR:.0%} bar); names the better answer "
        f"in {percent(check.recall, 0)} of the {check.truth_non_tie} pairs that have one; "
        f"order-consistent on {percent(check.position_consistent, 0)}; "
        f"{check.stats.unparseable} unparseable"
    )
    _log_judge_check(settings, check)


def _calibrate_champion(
    settings: Settings, admin: GatewayAdmin, version: int, console: Console
) -> None:
    from stillhouse.common.calibration_tags import read_calibration
    from stillhouse.rollout.calibration.job import calibrate_version

    registry = RegistryClient.from_settings(settings)
    info = registry.resolve_version(version)
    found, _ = read_calibration(info.tags, settings.gateway.confidence)
    if found is None:
        engines = admin.engines()
        champion = engine_entry(engines, Role.CHAMPION)
        teacher = engine_entry(engines, Role.TEACHER)
        assert champion is not None and teacher is not None
        prompts, test_prompts = calibration_prompts(settings)
        console.print(f"calibrating the champion (version {version}) on {len(prompts)} prompts")
        calibrate_version(
            settings,
            version,
            student_url=champion["base_url"],
            student_name=champion["served_name"],
            teacher_url=teacher["base_url"],
            teacher_name=teacher["served_name"],
            prompts=prompts,
            test_prompts=test_prompts,
            console=console,
        )
        admin.refresh()
    elif found.certified:
        console.print(
            f"the champion (version {version}) is calibrated: threshold {found.threshold:.4f}, "
            f"student share {percent(found.student_share, 0)} on {found.n} held-out prompts"
        )
    else:
        console.print(
            f"the champion (version {version}) was calibrated, but no threshold kept its "
            f"unacceptable answers within ε on {found.n} held-out prompts: the gateway keeps "
            f"the configured threshold ({settings.gateway.confidence.threshold}) for it"
        )


def _rollout(
    settings: Settings,
    admin: GatewayAdmin,
    url: str,
    world: DemoWorld,
    students: DemoStudents,
    console: Console,
) -> None:
    registry = RegistryClient.from_settings(settings)

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    traffic = TrafficLoop(
        f"{url}/v1", demo_tickets(world), n_users=N_USERS, concurrency=CONCURRENCY
    )
    controller = cycle.ControllerThread(settings, admin, say)
    traffic.start()
    controller.start()
    try:
        good = students.challenger.version
        say(f"traffic: {N_USERS} users, {CONCURRENCY} at a time; challenger: version {good}")
        first = cycle.wait_for_decision(controller, good)
        cycle.print_outcome(first, console)
        if first.phase == "promoted":
            swap_started = time.time()
            champion = cycle.wait_for_role(admin, Role.CHAMPION, registry.version_uri(good))
            swap_ended = time.time()
            sent, failed = cycle.failed_during(settings, swap_started - 5, swap_ended + 5)
            say(
                f"hot swap: the gateway now serves version {good} as the champion "
                f"(threshold {champion.get('threshold')}); {sent} requests around the swap, "
                f"{failed} failed"
            )
        bad = students.degraded.version
        say(
            f"next week: the re-distillation registers version {bad} (shuffled answers) "
            "as the challenger"
        )
        # On two cores vLLM's default CPU binding puts every server's worker on core 0, where
        # busy servers starve one that is starting (measured: 9 ms of CPU in 6 minutes): the
        # demo pauses its traffic while the gateway starts the new challenger.
        tally = traffic.stop()
        registry.set_alias(Alias.CHALLENGER, bad)
        with console.status(f"the gateway starts version {bad}'s vLLM server"):
            cycle.wait_for_role(admin, Role.CHALLENGER, registry.version_uri(bad))
        traffic = TrafficLoop(
            f"{url}/v1", demo_tickets(world), n_users=N_USERS, concurrency=CONCURRENCY, tally=tally
        )
        traffic.start()
        second = cycle.wait_for_decision(controller, bad)
        cycle.print_outcome(second, console)
    finally:
        controller.stop()
        tally = traffic.stop()
    say(
        f"traffic: {tally.sent} tickets, {tally.failed} failed; arms {dict(tally.by_arm)}; "
        f"served by {dict(tally.by_served)}"
    )
    for error in tally.errors:
        say(f"  failed request: {error}")


def _log_judge_check(settings: Settings, check: JudgeCheck) -> None:
    tracker = RunTracker(RegistryClient.from_settings(settings), settings.mlflow.experiment)
    with tracker.run("judge-check", {"stillhouse.job": "judge-check"}) as run:
        run.log_metrics(
            {
                "pairs": check.pairs,
                "non_tie": check.non_tie,
                "agreement_non_tie": check.agreement_non_tie or float("nan"),
                "agreement_with_ties": check.agreement_with_ties or float("nan"),
                "position_consistent": check.position_consistent or float("nan"),
                "recall": check.recall or float("nan"),
                "unparseable": check.stats.unparseable,
            }
        )
