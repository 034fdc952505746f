"""The student side of a re-distillation run: build it, train it, save it for vLLM, score it.

A student is a smaller Llama that shares the teacher's tokenizer (shape from config), or the
current champion's weights as a warm start (`redistill.student.warm_start:
models:/stillhouse-student@champion`), optionally wrapped in LoRA adapters (merged back before
saving, so vLLM serves a plain model directory). Scoring it on a task is a plug-in
(`rollout/distill/hooks.py`): the run serves it on vLLM and hands the endpoint over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from stillhouse.common.config import Settings
from stillhouse.common.errors import UsageError
from stillhouse.common.progress import progress_bar
from stillhouse.common.registry import RegistryClient
from stillhouse.rollout.distill.config import DistillConfig
from stillhouse.rollout.distill.hooks import ServedEvaluation, ServedScores, scores_record
from stillhouse.rollout.distill.job import write_job
from stillhouse.rollout.distill.model import ModelShape, count_parameters, llama_config, new_model
from stillhouse.rollout.distill.targets import TeacherTarget
from stillhouse.rollout.distill.training import (
    DistillResult,
    EpochStats,
    build_examples,
    check_compatible,
    train_student,
)


@dataclass
class StudentRun:
    name: str
    model_dir: Path
    parameters: int
    result: DistillResult
    served: ServedScores | None = None  # when the student was scored on vLLM

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_dir": str(self.model_dir),
            "parameters": self.parameters,
            "result": self.result.to_dict(),
            "served": scores_record(self.served) if self.served is not None else None,
        }


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_spec(settings: Settings) -> dict[str, Any] | None:
    """peft's LoraConfig arguments, or None for full fine-tuning (one place for both paths)."""
    s = settings.redistill.student
    if not s.lora_rank:
        return None
    return {
        "r": s.lora_rank,
        "lora_alpha": s.lora_alpha,
        "lora_dropout": 0.05,
        "target_modules": LORA_TARGETS,
    }


def make_student(
    settings: Settings, teacher_dir: Path, registry: RegistryClient
) -> tuple[Any, PreTrainedTokenizerBase]:
    """A fresh student of the configured shape, or the warm-start model; LoRA if configured."""
    s = settings.redistill.student
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    if s.warm_start:
        path = (
            registry.download(s.warm_start, settings.state_dir / "models")
            if s.warm_start.startswith("models:/")
            else Path(s.warm_start)
        )
        if not (path / "config.json").is_file():
            raise UsageError(f"warm-start model has no config.json: {path}")
        model = LlamaForCausalLM.from_pretrained(str(path))
    else:
        heads = s.hidden_size // 64
        if heads * 64 != s.hidden_size:
            raise UsageError(
                f"redistill.student.hidden_size {s.hidden_size} must be a multiple of 64 "
                "(head_dim 64: vLLM's CPU attention rejects smaller heads)"
            )
        try:
            shape = ModelShape(
                s.hidden_size, s.intermediate_size, s.num_layers, heads, s.num_kv_heads or heads
            )
        except ValueError as e:
            raise UsageError(f"redistill.student: {e}") from None
        teacher_cfg = LlamaForCausalLM.config_class.from_pretrained(str(teacher_dir))
        config = llama_config(shape, tok, teacher_cfg.max_position_embeddings)
        model = new_model(config, settings.redistill.training.seed)
    check_compatible(model, tok)
    lora = lora_spec(settings)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**lora))
    return model, tok


def save_for_serving(model: Any, tok: PreTrainedTokenizerBase, out: Path) -> Path:
    """A plain transformers directory (LoRA merged) that vLLM serves as is."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    hf_logging.disable_progress_bar()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def train_and_save(
    name: str,
    student: Any,
    tok: PreTrainedTokenizerBase,
    cfg: DistillConfig,
    train_pairs: Sequence[tuple[list[dict[str, str]], TeacherTarget]],
    heldout_pairs: Sequence[tuple[list[dict[str, str]], TeacherTarget]],
    run_dir: Path,
    teacher_dir: Path,
    top_k: int,
    console: Console,
    on_epoch: Callable[[EpochStats], None] | None = None,
    *,
    lora: dict[str, int] | None = None,
    prepare_only: bool = False,
) -> StudentRun | None:
    """Train (or, with `prepare_only`, only write the job for `accelerate launch`)."""
    max_len = student.config.max_position_embeddings
    train = build_examples(tok, train_pairs, max_len)
    heldout = build_examples(tok, heldout_pairs, max_len)
    job_top_k = top_k if cfg.mode == "grey-box" else 0
    write_job(
        run_dir,
        cfg,
        train,
        heldout,
        student,
        pad_id=tok.pad_token_id,
        top_k=job_top_k,
        teacher_dir=teacher_dir,
        lora=lora,
    )
    if prepare_only:
        console.print(f"student ({name}): job written to {run_dir} ({len(train)} examples)")
        return None
    teacher = None
    if cfg.mode == "white-box":
        teacher = LlamaForCausalLM.from_pretrained(str(teacher_dir)).eval()
        check_compatible(student, tok, teacher)
    params = count_parameters(student)
    label = "SFT baseline (alpha 0)" if cfg.kd.alpha == 0 else f"KD ({cfg.kd.divergence})"
    console.print(
        f"student ({name}): {params / 1e6:.2f}M parameters, {label}, {len(train)} examples, "
        f"up to {cfg.epochs} epochs"
    )

    def epoch_line(s: EpochStats) -> None:
        console.print(
            f"  epoch {s.epoch}: train loss {s.train_loss:.4f}, held-out KL {s.heldout_kl:.4f}, "
            f"top-1 agreement {100 * s.heldout_top1:.1f} %"
        )
        if on_epoch is not None:
            on_epoch(s)

    with progress_bar(console) as progress:
        task = progress.add_task(f"training {name}", total=None, info="")
        result = train_student(
            student,
            train,
            heldout,
            cfg,
            tok.pad_token_id,
            run_dir,
            teacher=teacher,
            top_k=job_top_k,
            on_step=lambda step, total, loss: progress.update(
                task, completed=step, total=total, info=f"loss {loss:.3f}"
            ),
            on_epoch=epoch_line,
        )
    if result.stopped_early:
        console.print(f"  early stop: held-out KL did not improve for {cfg.patience} epoch(s)")
    model_dir = save_for_serving(student, tok, run_dir / "model")
    return StudentRun(name, model_dir, params, result)


def evaluate_on_vllm(
    settings: Settings,
    model_dir: Path,
    name: str,
    evaluate: ServedEvaluation,
    console: Console,
) -> ServedScores:
    """Serve the student in `model_dir` on vLLM (as `student-<name>`) for `evaluate` to score."""
    from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine

    served_name = f"student-{name}"
    engine = VllmEngine(EngineSpec(model_dir, served_name), settings.engine, settings.logs_dir)
    try:
        with console.status(f"serving student ({name}) on vLLM to score it"):
            engine.start()
            engine.wait_ready()
            return evaluate(engine.base_url, served_name, model_dir)
    finally:
        engine.stop()


def plot_history(results: dict[str, DistillResult], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_kl) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, r in results.items():
        epochs = [h.epoch for h in r.history]
        ax_loss.plot(epochs, [h.train_loss for h in r.history], marker="o", label=name)
        ax_kl.plot(epochs, [h.heldout_kl for h in r.history], marker="o", label=name)
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_kl.set(title="held-out KL(teacher || student)", xlabel="epoch")
    for ax in (ax_loss, ax_kl):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
