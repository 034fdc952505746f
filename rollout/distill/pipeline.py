"""One re-distillation run: recent prompts → teacher targets → student → evaluation → MLflow
registry version with the alias `challenger` (never `champion`: promotion is a separate step).

    stillhouse redistill            # the `redistill:` section of the config says what and how

`redistill.data.source` (the prompts) and `redistill.teacher.model` (the teacher's directory)
are required; task scoring and the teacher's card are plug-ins (`rollout/distill/hooks.py`).
Order matters for honesty: the duplicate check runs before any work (same data and config as an
existing version → say which and stop), and registration runs last, so a failed or interrupted
run registers nothing (its MLflow run ends FAILED or KILLED).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from stillhouse.common.config import Settings
from stillhouse.common.errors import UsageError
from stillhouse.common.progress import progress_bar
from stillhouse.common.registry import RegistryClient, VersionInfo
from stillhouse.common.roles import Alias
from stillhouse.common.tracking import ActiveRun, RunTracker, flatten
from stillhouse.rollout.distill import targets as tg
from stillhouse.rollout.distill.config import DistillConfig
from stillhouse.rollout.distill.data import (
    PromptRecord,
    PromptSelection,
    load_prompt_file,
    select_prompts,
)
from stillhouse.rollout.distill.hooks import DistillHooks, TeacherCard
from stillhouse.rollout.distill.metrics import recording_run
from stillhouse.rollout.distill.student import (
    StudentRun,
    evaluate_on_vllm,
    lora_spec,
    make_student,
    plot_history,
    train_and_save,
)
from stillhouse.rollout.distill.targets import TeacherTarget
from stillhouse.rollout.distill.training import DistillResult, EpochStats

# Settings that change what is reported but not which student gets trained.
_NOT_IN_CONFIG_HASH = ("evaluate_served", "sft_baseline")

Pairs = list[tuple[list[dict[str, str]], TeacherTarget]]


@dataclass
class RedistillOutcome:
    version: VersionInfo | None
    duplicate_of: VersionInfo | None = None
    runs: dict[str, StudentRun] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    teacher: TeacherCard | None = None  # from the hooks: the teacher's size and task scores
    seconds: float = 0.0


@dataclass(frozen=True)
class RunInputs:
    """What one run distils from, fixed before any work: prompts, teacher, identity."""

    source: Path
    teacher_dir: Path
    teacher_fingerprint: str
    selection: PromptSelection
    window: timedelta | None
    identity: dict[str, str]  # dataset_hash, config_hash: the duplicate check's key
    run_dir: Path  # <state_dir>/runs/<dataset_hash>-<config_hash>: one folder per variant


def shuffled_targets(pairs: list[tuple[Any, Any]], seed: int) -> list[tuple[Any, Any]]:
    """Each prompt paired with another prompt's target (a seeded cyclic shift of a permutation,
    so no prompt keeps its own unless all targets are the same)."""
    import random

    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    moved = order[1:] + order[:1]
    out = list(pairs)
    for src, dst in zip(order, moved, strict=True):
        out[dst] = (pairs[dst][0], pairs[src][1])
    return out


def config_hash(settings: Settings, teacher_fingerprint: str) -> str:
    """Identifies how the student is trained. Where the prompts and the teacher live is left
    out (hashed as unset): their content is in the dataset hash and the teacher fingerprint,
    so moving a file retrains nothing, and versions registered when the demo world filled
    both in keep their identity."""
    cfg = settings.redistill.model_dump(mode="json", exclude=set(_NOT_IN_CONFIG_HASH))
    cfg["data"]["source"] = cfg["teacher"]["model"] = None
    payload = json.dumps({"redistill": cfg, "teacher": teacher_fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def training_variants(settings: Settings) -> dict[str, DistillConfig]:
    """The students a run trains (`kd`, and `sft` for the SFT-only baseline), checked before any
    work: a config that cannot train fails in milliseconds, not after the teacher has answered
    thousands of prompts. Each problem is one `UsageError` line."""
    rs = settings.redistill
    if rs.filter.min_judge_score is not None:
        # The filter takes judge scores (targets.filter_targets), but no judge scores the
        # targets yet: refusing beats silently dropping every target as "low_judge_score".
        raise UsageError(
            "redistill.filter.min_judge_score needs judge scores, which the LLM judge "
            "(stillhouse judge) does not provide to re-distillation yet: unset it"
        )
    variants = {"kd": DistillConfig.from_settings(settings)}
    if rs.sft_baseline and rs.kd.alpha > 0:
        variants["sft"] = DistillConfig.from_settings(settings, sft_only=True)
    return variants


def required_inputs(settings: Settings) -> tuple[Path, Path]:
    """The prompt file and the teacher's model directory; a missing one is one UsageError line."""
    rs = settings.redistill
    if rs.data.source is None:
        raise UsageError(
            "redistill.data.source is not set: point it at a JSONL file of prompts "
            "(or STILLHOUSE_REDISTILL__DATA__SOURCE=PATH)"
        )
    if rs.teacher.model is None:
        raise UsageError(
            "redistill.teacher.model is not set: point it at the teacher's model directory "
            "(or STILLHOUSE_REDISTILL__TEACHER__MODEL=PATH)"
        )
    teacher_dir = Path(rs.teacher.model)
    if not (teacher_dir / "config.json").is_file():
        raise UsageError(f"teacher model directory has no config.json: {teacher_dir}")
    return Path(rs.data.source), teacher_dir


def run_inputs(settings: Settings, now: datetime) -> RunInputs:
    """Load and select the prompts, fingerprint the teacher, and derive the run's identity."""
    rs = settings.redistill
    source, teacher_dir = required_inputs(settings)
    window = timedelta(days=rs.data.window_days) if rs.data.window_days else None
    selection = select_prompts(
        load_prompt_file(source),
        now=now,
        window=window,
        max_prompts=rs.data.max_prompts,
        heldout_share=rs.data.heldout_share,
        seed=rs.training.seed,
    )
    fingerprint = tg.fingerprint_model_dir(teacher_dir)
    chash = config_hash(settings, fingerprint)
    identity = {"dataset_hash": selection.dataset_hash, "config_hash": chash}
    run_dir = settings.state_dir / "runs" / f"{selection.dataset_hash}-{chash}"
    return RunInputs(source, teacher_dir, fingerprint, selection, window, identity, run_dir)


@contextmanager
def teacher_endpoint(settings: Settings, teacher_dir: Path, console: Console) -> Iterator[str]:
    """The teacher's base URL: the configured server, or a vLLM engine started for the run."""
    if settings.redistill.teacher.base_url:
        yield settings.redistill.teacher.base_url
        return
    from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine

    name = settings.redistill.teacher.served_name
    engine = VllmEngine(EngineSpec(teacher_dir, name), settings.engine, settings.logs_dir)
    try:
        with console.status(f"starting vLLM for the teacher (log: {engine.log_path})"):
            engine.start()
            engine.wait_ready()
        yield engine.base_url
    finally:
        engine.stop()


def collect(
    settings: Settings,
    teacher_dir: Path,
    records: list[PromptRecord],
    console: Console,
) -> tuple[dict[str, tg.TeacherTarget], tg.CollectionStats]:
    from openai import OpenAI
    from transformers import AutoTokenizer

    t = settings.redistill.teacher
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    rendered = [
        (r, tok.apply_chat_template(r.chat, add_generation_prompt=True, tokenize=False))
        for r in records
    ]
    req = tg.TargetRequest(
        t.targets, t.top_k, t.max_tokens, t.temperature, tg.fingerprint_model_dir(teacher_dir)
    )
    cache = tg.TargetCache(settings.state_dir / "cache" / "targets.sqlite")
    key = t.api_key.get_secret_value() if t.api_key else "unused"
    try:
        cached = cache.get_many([req.cache_key(r.key) for r in records])
        endpoint = (
            teacher_endpoint(settings, teacher_dir, console)
            if len(cached) < len(records)
            else nullcontext("(all targets cached)")
        )
        with endpoint as base_url, progress_bar(console) as progress:
            task = progress.add_task("teacher targets", total=len(records), info="")
            client = OpenAI(base_url=base_url, api_key=key, timeout=t.timeout_s, max_retries=0)
            return tg.collect_targets(
                client,
                t.served_name,
                rendered,
                req,
                cache,
                batch_size=t.batch_size,
                concurrency=t.concurrency,
                retries=t.retries,
                on_progress=lambda done, total: progress.update(task, completed=done),
            )
    finally:
        cache.close()


def _data_window(records: list[PromptRecord], now: datetime, window: timedelta | None) -> str:
    stamps = [r.timestamp for r in records if r.timestamp is not None]
    if not stamps:
        return "all (no timestamps)"
    start = now - window if window else min(stamps)
    return f"{start:%Y-%m-%dT%H:%MZ}..{now:%Y-%m-%dT%H:%MZ}"


def redistill(
    settings: Settings,
    console: Console,
    *,
    hooks: DistillHooks | None = None,
    now: datetime | None = None,
    prepare_only: bool = False,
    alias: str | None = Alias.CHALLENGER,
) -> RedistillOutcome:
    """Distil and register one student; `alias` (default `challenger`, None for none) is set
    on the new version. `hooks` add task scores and the teacher's card to the result. Every
    complete run (not `prepare_only`) is recorded, success or failure, in
    `<state_dir>/metrics/redistill.prom` for the dashboard and the alerts."""
    hooks = hooks or DistillHooks()
    if prepare_only:
        return _redistill(settings, console, hooks, now=now, prepare_only=True, alias=alias)
    with recording_run(settings.metrics_dir / "redistill.prom"):
        return _redistill(settings, console, hooks, now=now, prepare_only=False, alias=alias)


def _redistill(
    settings: Settings,
    console: Console,
    hooks: DistillHooks,
    *,
    now: datetime | None,
    prepare_only: bool,
    alias: str | None,
) -> RedistillOutcome:
    started = time.monotonic()
    now = now or datetime.now(UTC)
    variants = training_variants(settings)
    inputs = run_inputs(settings, now)
    registry = RegistryClient.from_settings(settings)
    existing = registry.find_version(inputs.identity)
    if existing is not None:
        console.print(
            f"already registered: version {existing.version} of {existing.name} was distilled "
            f"from the same data ({inputs.identity['dataset_hash']}) and config "
            f"({inputs.identity['config_hash']}); nothing to do"
        )
        return RedistillOutcome(None, duplicate_of=existing, seconds=time.monotonic() - started)
    console.print(_selection_line(inputs))

    outcome = RedistillOutcome(
        None, counts=dict(inputs.selection.counts), teacher=hooks.teacher_card
    )
    tracker = RunTracker(registry, settings.mlflow.experiment)
    run_tags = {"stillhouse.job": "redistill", **inputs.identity}
    with tracker.run(f"redistill-{now:%Y%m%d-%H%M%S}", run_tags) as run:
        run.log_params(
            {
                **flatten({"redistill": settings.redistill.model_dump(mode="json")}),
                "teacher": str(inputs.teacher_dir),
                "teacher_fingerprint": inputs.teacher_fingerprint,
                **inputs.identity,
            }
        )
        pairs = teacher_pairs(settings, inputs, console, run, outcome)
        outcome.runs = train_students(
            settings,
            registry,
            variants,
            inputs,
            pairs,
            run,
            console,
            prepare_only=prepare_only,
        )
        if prepare_only:
            run.set_tags({"stillhouse.prepare_only": "true"})
            console.print(
                "jobs written; train them with `accelerate launch -m "
                f"stillhouse.rollout.distill.job {inputs.run_dir}/<variant>`, then run "
                "`stillhouse redistill` again to evaluate and register"
            )
            return outcome
        evaluate = hooks.served_evaluation
        if settings.redistill.evaluate_served and evaluate is not None:
            for name, result in outcome.runs.items():
                result.served = evaluate_on_vllm(
                    settings, result.model_dir, name, evaluate, console
                )
        outcome.version = log_and_register(settings, registry, inputs, outcome, run, now, alias)
    # Registered: the checkpoints only served a resume after a crash, and a later run with
    # this identity is refused as a duplicate anyway.
    shutil.rmtree(inputs.run_dir, ignore_errors=True)
    outcome.seconds = time.monotonic() - started
    return outcome


def _selection_line(inputs: RunInputs) -> str:
    counts = inputs.selection.counts
    skipped = ", ".join(
        f"{k} {v}"
        for k, v in counts.items()
        if k in ("out_of_window", "duplicate", "over_cap") and v
    )
    return (
        f"data: {inputs.source} -> {counts.get('train', 0)} train / "
        f"{counts.get('heldout', 0)} held-out prompts " + skipped
    )


def teacher_pairs(
    settings: Settings,
    inputs: RunInputs,
    console: Console,
    run: ActiveRun,
    outcome: RedistillOutcome,
) -> tuple[Pairs, Pairs]:
    """The teacher's targets for every selected prompt, filtered; (train, held-out) pairs of
    (chat, target). Counts go to `outcome.counts` and the MLflow run."""
    rs = settings.redistill
    selection = inputs.selection
    everything = [*selection.train, *selection.heldout]
    targets, stats = collect(settings, inputs.teacher_dir, everything, console)
    qf = tg.QualityFilter(
        rs.filter.min_tokens,
        rs.filter.max_tokens,
        rs.filter.drop_truncated,
        rs.filter.answer_format,
        rs.filter.min_judge_score,
    )
    kept, dropped = tg.filter_targets(targets, qf)
    console.print(
        f"teacher targets ({rs.teacher.targets}): {stats.requested} prompts, "
        f"{stats.from_cache} from cache, {stats.asked} asked in {stats.seconds:.0f} s; "
        f"kept {len(kept)}, dropped {sum(dropped.values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(dropped.items()))})" if dropped else "")
    )
    outcome.counts.update(
        targets_kept=len(kept),
        targets_asked=stats.asked,
        **{f"dropped_{k}": v for k, v in dropped.items()},
    )
    run.log_metrics(
        {
            "targets_kept": len(kept),
            "targets_dropped": sum(dropped.values()),
            "targets_seconds": stats.seconds,
        }
    )
    train_pairs = [(r.chat, kept[r.key]) for r in selection.train if r.key in kept]
    if rs.data.shuffle_targets:
        train_pairs = shuffled_targets(train_pairs, rs.training.seed)
        console.print("[yellow]shuffle_targets is on: training on mismatched answers[/]")
    heldout_pairs = [(r.chat, kept[r.key]) for r in selection.heldout if r.key in kept]
    return train_pairs, heldout_pairs


def train_students(
    settings: Settings,
    registry: RegistryClient,
    variants: dict[str, DistillConfig],
    inputs: RunInputs,
    pairs: tuple[Pairs, Pairs],
    run: ActiveRun,
    console: Console,
    *,
    prepare_only: bool,
) -> dict[str, StudentRun]:
    """Train each variant in `<state_dir>/runs/<dataset>-<config>/<variant>` (with
    `prepare_only`, only write its job); per-epoch metrics go to the MLflow run."""
    train_pairs, heldout_pairs = pairs
    runs: dict[str, StudentRun] = {}
    for name, cfg in variants.items():
        student, tok = make_student(settings, inputs.teacher_dir, registry)
        result = train_and_save(
            name,
            student,
            tok,
            cfg,
            train_pairs,
            heldout_pairs,
            inputs.run_dir / name,
            inputs.teacher_dir,
            settings.redistill.teacher.top_k,
            console,
            on_epoch=lambda s, n=name: run.log_metrics(_epoch_metrics(n, s), step=s.epoch),
            lora=lora_spec(settings),
            prepare_only=prepare_only,
        )
        if result is not None:
            runs[name] = result
    return runs


def log_and_register(
    settings: Settings,
    registry: RegistryClient,
    inputs: RunInputs,
    outcome: RedistillOutcome,
    run: ActiveRun,
    now: datetime,
    alias: str | None,
) -> VersionInfo:
    """Log the summary, evaluation and loss curves to the run; register the KD student."""
    summary = _summary(outcome)
    run.log_metrics(summary)
    run.log_json({n: r.to_dict() for n, r in outcome.runs.items()}, "eval.json")
    run.log_json(settings.redistill.model_dump(mode="json"), "config.json")
    plot = plot_history({n: r.result for n, r in outcome.runs.items()}, inputs.run_dir / "loss.png")
    run.log_artifact(plot)
    tags = {
        **inputs.identity,
        "teacher": str(inputs.teacher_dir),
        "teacher_fingerprint": inputs.teacher_fingerprint,
        "data_window": _data_window(inputs.selection.train, now, inputs.window),
        "targets": settings.redistill.teacher.targets,
        **{k: f"{v:.4f}" for k, v in summary.items() if k.startswith("kd.")},
    }
    return registry.register_version(run.run_id, outcome.runs["kd"].model_dir, tags, alias=alias)


def _epoch_metrics(name: str, s: EpochStats) -> dict[str, float]:
    return {
        f"{name}.train_loss": s.train_loss,
        f"{name}.heldout_kl": s.heldout_kl,
        f"{name}.heldout_top1": s.heldout_top1,
        f"{name}.lr": s.learning_rate,
    }


def _summary(outcome: RedistillOutcome) -> dict[str, float]:
    out: dict[str, float] = {}
    teacher_cat = outcome.teacher.category_accuracy if outcome.teacher is not None else None
    for name, r in outcome.runs.items():
        best = _best(r.result)
        out[f"{name}.best_heldout_kl"] = best.heldout_kl
        out[f"{name}.best_heldout_top1"] = best.heldout_top1
        out[f"{name}.parameters"] = r.parameters
        out[f"{name}.train_seconds"] = r.result.seconds
        out[f"{name}.train_tokens_per_s"] = r.result.train_tokens / max(r.result.seconds, 1e-9)
        if r.served is not None:
            out[f"{name}.category_accuracy"] = r.served.category_accuracy
            out[f"{name}.priority_accuracy"] = r.served.priority_accuracy
            out[f"{name}.hard_category_accuracy"] = r.served.hard_category_accuracy
            if teacher_cat:
                out[f"{name}.category_vs_teacher"] = r.served.category_accuracy / teacher_cat
    return out


def _best(result: DistillResult) -> EpochStats:
    return next(h for h in result.history if h.epoch == result.best_epoch)
