"""One re-distillation run: recent prompts → teacher targets → student → evaluation → MLflow
registry version with the alias `challenger` (never `champion`: promotion is a separate step).

    stillhouse redistill            # the demo world by default; see `redistill:` in the config

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
from stillhouse.common.tracking import RunTracker, flatten
from stillhouse.demo.build import build_demo_world
from stillhouse.rollout.distill import targets as tg
from stillhouse.rollout.distill.data import PromptRecord, load_prompt_file, select_prompts
from stillhouse.rollout.distill.losses import KDLossConfig
from stillhouse.rollout.distill.metrics import recording_run
from stillhouse.rollout.distill.student import (
    StudentRun,
    evaluate_on_vllm,
    lora_spec,
    make_student,
    plot_history,
    train_and_save,
)
from stillhouse.rollout.distill.training import DistillConfig, DistillResult, EpochStats

# Settings that change what is reported but not which student gets trained.
_NOT_IN_CONFIG_HASH = ("evaluate_served", "sft_baseline")


@dataclass
class RedistillOutcome:
    version: VersionInfo | None
    duplicate_of: VersionInfo | None = None
    runs: dict[str, StudentRun] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] | None = None  # the demo teacher's size and vLLM-served accuracy
    seconds: float = 0.0


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
    cfg = settings.redistill.model_dump(mode="json", exclude=set(_NOT_IN_CONFIG_HASH))
    payload = json.dumps({"redistill": cfg, "teacher": teacher_fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def distill_config(settings: Settings, *, sft_only: bool = False) -> DistillConfig:
    """The training config; a combination pydantic cannot judge alone is one UsageError line."""
    try:
        return _distill_config(settings, sft_only=sft_only)
    except ValueError as e:
        raise UsageError(f"redistill config: {e}") from None


def _distill_config(settings: Settings, *, sft_only: bool) -> DistillConfig:
    rs = settings.redistill
    kd = KDLossConfig(
        divergence=rs.kd.divergence,
        alpha=0.0 if sft_only else rs.kd.alpha,
        temperature=rs.kd.temperature,
        beta=rs.kd.beta,
        skew=rs.kd.skew,
    )
    t = rs.training
    return DistillConfig(
        mode=rs.teacher.targets,
        epochs=t.epochs,
        learning_rate=t.learning_rate,
        warmup_ratio=t.warmup_ratio,
        min_lr_ratio=t.min_lr_ratio,
        weight_decay=t.weight_decay,
        batch_tokens=t.batch_tokens,
        grad_clip=t.grad_clip,
        patience=t.patience,
        seed=t.seed,
        kd=kd,
    )


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
    now: datetime | None = None,
    prepare_only: bool = False,
    alias: str | None = "challenger",
) -> RedistillOutcome:
    """Distil and register one student; `alias` (default `challenger`, None for none) is set
    on the new version. Every complete run (not `prepare_only`) is recorded, success or
    failure, in `<state_dir>/metrics/redistill.prom` for the dashboard and the alerts."""
    if prepare_only:
        return _redistill(settings, console, now=now, prepare_only=True, alias=alias)
    with recording_run(settings.metrics_dir / "redistill.prom"):
        return _redistill(settings, console, now=now, prepare_only=False, alias=alias)


def _redistill(
    settings: Settings,
    console: Console,
    *,
    now: datetime | None,
    prepare_only: bool,
    alias: str | None,
) -> RedistillOutcome:
    started = time.monotonic()
    now = now or datetime.now(UTC)
    rs = settings.redistill
    if rs.filter.min_judge_score is not None:
        # The filter takes judge scores (targets.filter_targets), but no judge scores the
        # targets yet: refusing beats silently dropping every target as "low_judge_score".
        raise UsageError(
            "redistill.filter.min_judge_score needs judge scores, which the LLM judge "
            "(stillhouse judge) does not provide to re-distillation yet: unset it"
        )
    # Checked before any work: a config that cannot train fails in milliseconds, not after
    # the teacher has answered thousands of prompts.
    variants = {"kd": distill_config(settings)}
    if rs.sft_baseline and rs.kd.alpha > 0:
        variants["sft"] = distill_config(settings, sft_only=True)
    world = None
    if rs.data.source is None or rs.teacher.model is None:
        world = build_demo_world(settings, console=console)
    source = rs.data.source or world.corpus_dir / "train.jsonl"
    teacher_dir = Path(rs.teacher.model) if rs.teacher.model else world.teacher_dir
    if not (teacher_dir / "config.json").is_file():
        raise UsageError(f"teacher model directory has no config.json: {teacher_dir}")

    window = timedelta(days=rs.data.window_days) if rs.data.window_days else None
    records = load_prompt_file(source)
    selection = select_prompts(
        records,
        now=now,
        window=window,
        max_prompts=rs.data.max_prompts,
        heldout_share=rs.data.heldout_share,
        seed=rs.training.seed,
    )
    fingerprint = tg.fingerprint_model_dir(teacher_dir)
    chash = config_hash(settings, fingerprint)
    registry = RegistryClient.from_settings(settings)
    identity = {"dataset_hash": selection.dataset_hash, "config_hash": chash}
    existing = registry.find_version(identity)
    if existing is not None:
        console.print(
            f"already registered: version {existing.version} of {existing.name} was distilled "
            f"from the same data ({selection.dataset_hash}) and config ({chash}); nothing to do"
        )
        return RedistillOutcome(None, duplicate_of=existing, seconds=time.monotonic() - started)
    console.print(
        f"data: {source} -> {selection.counts.get('train', 0)} train / "
        f"{selection.counts.get('heldout', 0)} held-out prompts "
        + ", ".join(
            f"{k} {v}"
            for k, v in selection.counts.items()
            if k in ("out_of_window", "duplicate", "over_cap") and v
        )
    )

    tracker = RunTracker(registry, settings.mlflow.experiment)
    run_tags = {"stillhouse.job": "redistill", **identity}
    outcome = RedistillOutcome(None, counts=dict(selection.counts))
    if world is not None and teacher_dir == world.teacher_dir:
        outcome.teacher = {
            "parameters": world.manifest["teacher"]["parameters"],
            **world.manifest.get("teacher_eval", {}),
        }
    with tracker.run(f"redistill-{now:%Y%m%d-%H%M%S}", run_tags) as run:
        run.log_params(
            {
                **flatten({"redistill": rs.model_dump(mode="json")}),
                "teacher": str(teacher_dir),
                "teacher_fingerprint": fingerprint,
                **identity,
            }
        )
        everything = [*selection.train, *selection.heldout]
        targets, stats = collect(settings, teacher_dir, everything, console)
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

        run_dir = settings.state_dir / "runs" / f"{selection.dataset_hash}-{chash}"
        lora = lora_spec(settings)
        for name, cfg in variants.items():
            student, tok = make_student(settings, teacher_dir, registry)
            result = train_and_save(
                name,
                student,
                tok,
                cfg,
                train_pairs,
                heldout_pairs,
                run_dir / name,
                teacher_dir,
                rs.teacher.top_k,
                console,
                on_epoch=lambda s, n=name: run.log_metrics(_epoch_metrics(n, s), step=s.epoch),
                lora=lora,
                prepare_only=prepare_only,
            )
            if result is not None:
                outcome.runs[name] = result
        if prepare_only:
            run.set_tags({"stillhouse.prepare_only": "true"})
            console.print(
                "jobs written; train them with `accelerate launch -m "
                f"stillhouse.rollout.distill.job {run_dir}/<variant>`, then run "
                "`stillhouse redistill` again to evaluate and register"
            )
            return outcome
        if rs.evaluate_served and world is not None:
            for name, result in outcome.runs.items():
                result.served = evaluate_on_vllm(settings, result.model_dir, name, world, console)
        summary = _summary(outcome, world)
        run.log_metrics(summary)
        run.log_json({n: r.to_dict() for n, r in outcome.runs.items()}, "eval.json")
        run.log_json(settings.redistill.model_dump(mode="json"), "config.json")
        plot = plot_history({n: r.result for n, r in outcome.runs.items()}, run_dir / "loss.png")
        run.log_artifact(plot)
        kd_run = outcome.runs["kd"]
        tags = {
            **identity,
            "teacher": str(teacher_dir),
            "teacher_fingerprint": fingerprint,
            "data_window": _data_window(selection.train, now, window),
            "targets": rs.teacher.targets,
            **{k: f"{v:.4f}" for k, v in summary.items() if k.startswith("kd.")},
        }
        outcome.version = registry.register_version(run.run_id, kd_run.model_dir, tags, alias=alias)
    # Registered: the checkpoints only served a resume after a crash, and a later run with
    # this identity is refused as a duplicate anyway.
    shutil.rmtree(run_dir, ignore_errors=True)
    outcome.seconds = time.monotonic() - started
    return outcome


def _epoch_metrics(name: str, s: EpochStats) -> dict[str, float]:
    return {
        f"{name}.train_loss": s.train_loss,
        f"{name}.heldout_kl": s.heldout_kl,
        f"{name}.heldout_top1": s.heldout_top1,
        f"{name}.lr": s.learning_rate,
    }


def _summary(outcome: RedistillOutcome, world: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    teacher_eval = (world.manifest.get("teacher_eval") or {}) if world is not None else {}
    teacher_cat = teacher_eval.get("triage", {}).get("category_accuracy")
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
