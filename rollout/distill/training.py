"""Distil a student from teacher targets: the training loop, held-out evaluation, checkpoints.

Read top to bottom: examples → batches → (student forward, teacher forward in white-box mode)
→ loss from `rollout.losses` → clip → step → per-epoch held-out KL and top-1 agreement →
checkpoint → early stop. The loop runs through `accelerate`, so the same code runs on one CPU
here and under DDP or FSDP across GPUs and nodes:

    accelerate launch --multi_gpu --num_processes 8 -m stillhouse.rollout.distill.job JOB_DIR

Resuming: a checkpoint is written after every epoch (model, optimizer, epoch, history); a run
started again with the same run directory continues after the last finished epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from stillhouse.common.errors import StillhouseError
from stillhouse.demo.teacher import lr_at, token_budget_batches
from stillhouse.rollout.distill.losses import KDLossConfig, kd_loss, sparse_kd_loss
from stillhouse.rollout.distill.targets import TeacherTarget


class ConfigMismatchError(StillhouseError, ValueError):
    """Student and teacher cannot be distilled together (a vocabulary mismatch, ...)."""

    exit_code = 2


@dataclass(frozen=True)
class DistillExample:
    input_ids: tuple[int, ...]
    answer_start: int  # index of the first answer token in input_ids
    top_ids: tuple[tuple[int, ...], ...] | None = None  # one row per answer token
    top_logprobs: tuple[tuple[float, ...], ...] | None = None


@dataclass(frozen=True)
class DistillConfig:
    """How to train. `__post_init__` rejects values that cannot work, before the first step."""

    mode: str = "grey-box"  # black-box | grey-box | white-box
    epochs: int = 6
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    batch_tokens: int = 4096
    grad_clip: float = 1.0
    patience: int = 2
    seed: int = 0
    kd: KDLossConfig = field(default_factory=KDLossConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("black-box", "grey-box", "white-box"):
            raise ValueError(f"mode must be black-box, grey-box or white-box, not {self.mode!r}")
        if self.epochs < 1 or self.patience < 1 or self.batch_tokens < 64:
            raise ValueError("epochs and patience must be >= 1 and batch_tokens >= 64")
        if not 0 < self.learning_rate <= 1 or self.grad_clip <= 0:
            raise ValueError("learning_rate must be in (0, 1] and grad_clip > 0")
        if self.mode == "grey-box" and self.kd.temperature != 1.0 and self.kd.alpha > 0:
            raise ValueError(
                "grey-box targets are top-k log-probabilities at temperature 1: set "
                "kd.temperature to 1, or use white-box targets for another temperature"
            )


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    heldout_kl: float
    heldout_top1: float
    learning_rate: float


@dataclass
class DistillResult:
    history: list[EpochStats]
    best_epoch: int
    stopped_early: bool
    steps: int
    train_tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "history": [asdict(h) for h in self.history]}


def check_compatible(
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel | None = None,
) -> None:
    """Reject a student that cannot learn from the teacher's token ids, with the fix."""
    s_vocab = student.get_input_embeddings().weight.shape[0]
    if s_vocab < len(tokenizer):
        raise ConfigMismatchError(
            f"student vocabulary ({s_vocab}) is smaller than the teacher tokenizer "
            f"({len(tokenizer)} tokens): build the student from the teacher's tokenizer "
            "(same vocab_size)"
        )
    if teacher is not None:
        t_vocab = teacher.get_input_embeddings().weight.shape[0]
        if t_vocab != s_vocab:
            raise ConfigMismatchError(
                f"student vocabulary ({s_vocab}) differs from the teacher's ({t_vocab}): "
                "white-box distillation compares logits token by token, so the student must "
                "share the teacher's tokenizer and vocab_size"
            )


def build_examples(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[list[dict[str, str]], TeacherTarget]],
    max_len: int,
) -> list[DistillExample]:
    """Prompt (chat-rendered) + the teacher's answer tokens; too-long examples are dropped."""
    examples = []
    for messages, target in pairs:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = (*prompt_ids, *target.token_ids)
        if len(ids) > max_len or not target.token_ids:
            continue
        examples.append(DistillExample(ids, len(prompt_ids), target.top_ids, target.top_logprobs))
    return examples


def collate(batch: Sequence[DistillExample], pad_id: int, top_k: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors. `mask[b, i]` is True where logits at i predict an answer token."""
    width = max(len(e.input_ids) for e in batch)
    n = len(batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    targets = torch.zeros((n, width), dtype=torch.long)
    top_ids = torch.arange(max(top_k, 1)).repeat(n, width, 1)  # distinct filler where unused
    top_lps = torch.zeros((n, width, max(top_k, 1)))
    for row, e in enumerate(batch):
        length, start = len(e.input_ids), e.answer_start
        input_ids[row, :length] = torch.tensor(e.input_ids)
        attention[row, :length] = 1
        mask[row, start - 1 : length - 1] = True
        targets[row, start - 1 : length - 1] = torch.tensor(e.input_ids[start:])
        if top_k and e.top_ids is not None and e.top_logprobs is not None:
            k = min(top_k, len(e.top_ids[0]))
            top_ids[row, start - 1 : length - 1, :k] = torch.tensor([r[:k] for r in e.top_ids])
            top_lps[row, start - 1 : length - 1, :k] = torch.tensor([r[:k] for r in e.top_logprobs])
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mask": mask,
        "targets": targets,
        "top_ids": top_ids,
        "top_logprobs": top_lps,
    }


def batch_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    cfg: DistillConfig,
) -> torch.Tensor:
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["mask"]
    if cfg.mode == "black-box" or cfg.kd.alpha == 0.0:
        if not mask.any():  # nothing to learn from: a zero loss that still has a graph
            return logits.sum() * 0.0
        return F.cross_entropy(logits[mask], batch["targets"][mask])
    # Nothing reads the logits after the loss (lm_head's backward needs only its input), so the
    # loss may write its gradient into their storage: one [tokens x vocab] tensor, not two.
    kd_cfg = dataclasses.replace(cfg.kd, inplace_grad=torch.is_grad_enabled())
    if cfg.mode == "white-box":
        assert teacher is not None, "white-box distillation needs the teacher's weights"
        with torch.no_grad():
            t_logits = teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        return kd_loss(
            logits, t_logits[..., : logits.shape[-1]], batch["mask"], batch["targets"], kd_cfg
        )
    return sparse_kd_loss(
        logits, batch["top_ids"], batch["top_logprobs"], batch["mask"], batch["targets"], kd_cfg
    )


@torch.no_grad()
def heldout_metrics(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    examples: Sequence[DistillExample],
    pad_id: int,
    top_k: int,
    batch_tokens: int,
) -> tuple[float, float]:
    """Mean KL(teacher ‖ student) per answer token, and top-1 agreement with the teacher.

    With a local teacher the KL is over the full vocabulary; with top-k targets it is the
    top-k + tail estimate of `rollout.losses` (a lower bound on the full KL); with text only
    it is the student's cross-entropy on the teacher's tokens (the KL up to the teacher's
    unknown entropy). Top-1 agreement compares the student's argmax with the teacher's token.
    """
    student.eval()
    kl_sum = agree = n = 0.0
    kl_cfg = KDLossConfig(alpha=1.0)
    for idx in token_budget_batches(list(_as_pairs(examples)), batch_tokens, random.Random(0)):
        batch = collate([examples[i] for i in idx], pad_id, top_k)
        logits = student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        m = batch["mask"]
        count = float(m.sum())
        if count == 0:
            continue
        if teacher is not None:
            t_logits = teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            kl = kd_loss(logits, t_logits[..., : logits.shape[-1]], m, config=kl_cfg)
        elif top_k and examples[idx[0]].top_ids is not None:
            kl = sparse_kd_loss(logits, batch["top_ids"], batch["top_logprobs"], m, config=kl_cfg)
        else:
            kl = F.cross_entropy(logits[m], batch["targets"][m])
        kl_sum += float(kl) * count
        agree += float((logits.argmax(-1)[m] == batch["targets"][m]).sum())
        n += count
    student.train()
    return (kl_sum / n, agree / n) if n else (math.nan, math.nan)


def _as_pairs(examples: Sequence[DistillExample]) -> list[tuple[list[int], list[int]]]:
    # token_budget_batches only looks at lengths
    return [(list(e.input_ids), []) for e in examples]


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "best": best},
        tmp / "state.pt",
    )
    (tmp / "progress.json").write_text(json.dumps(state))
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)  # an interrupted save never replaces a good checkpoint


def train_student(
    student: LlamaForCausalLM,
    train: Sequence[DistillExample],
    heldout: Sequence[DistillExample],
    cfg: DistillConfig,
    pad_id: int,
    run_dir: Path,
    *,
    teacher: PreTrainedModel | None = None,
    top_k: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> DistillResult:
    """Train `student` in place on `train`; the best epoch (lowest held-out KL) is loaded back
    at the end. Resumes from `run_dir/checkpoint` when one exists."""
    import time

    from accelerate import Accelerator

    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator()
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in student.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in decay if p.requires_grad], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.requires_grad], "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
        betas=(0.9, 0.98),
    )
    model, optimizer = accelerator.prepare(student, optimizer)
    if teacher is not None:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)

    pairs = _as_pairs(train)
    per_epoch = len(token_budget_batches(pairs, cfg.batch_tokens, random.Random(0)))
    per_epoch = max(1, per_epoch // accelerator.num_processes)
    total = per_epoch * cfg.epochs
    sched_cfg = _Sched(cfg.learning_rate, cfg.warmup_ratio, cfg.min_lr_ratio)

    ckpt = run_dir / "checkpoint"
    best_state: dict[str, torch.Tensor] | None = None
    progress: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "history": [],
        "best_kl": None,
        "best_epoch": 0,
        "bad_epochs": 0,
        "tokens": 0,
    }
    if (ckpt / "progress.json").is_file():
        saved = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        accelerator.unwrap_model(model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        best_state = saved["best"]
        progress = json.loads((ckpt / "progress.json").read_text())
        for done in progress["history"]:  # replay, so the caller's record of epochs is whole
            if on_epoch is not None:
                on_epoch(EpochStats(**done))

    stopped_early = progress["bad_epochs"] >= cfg.patience
    model.train()
    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
        if stopped_early:
            break
        rng = random.Random(cfg.seed * 1000 + epoch)
        batches = token_budget_batches(pairs, cfg.batch_tokens, rng)
        mine = batches[accelerator.process_index :: accelerator.num_processes][:per_epoch]
        losses = []
        for idx in mine:
            lr = lr_at(progress["step"], total, sched_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = {
                k: v.to(accelerator.device)
                for k, v in collate([train[i] for i in idx], pad_id, top_k).items()
            }
            loss = batch_loss(model, teacher, batch, cfg)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(loss.detach().item())
            progress["step"] += 1
            progress["tokens"] += int(batch["attention_mask"].sum())
            if on_step is not None:
                on_step(progress["step"], total, losses[-1])
        kl, top1 = heldout_metrics(model, teacher, heldout, pad_id, top_k, cfg.batch_tokens)
        stats = EpochStats(epoch, sum(losses) / max(1, len(losses)), kl, top1, lr)
        progress["history"].append(asdict(stats))
        if progress["best_kl"] is None or kl < progress["best_kl"]:
            progress.update(best_kl=kl, best_epoch=epoch, bad_epochs=0)
            best_state = _state_copy(accelerator.unwrap_model(model))
        else:
            progress["bad_epochs"] += 1
        progress["epoch"] = epoch
        if accelerator.is_main_process:
            _save_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, best_state, progress)
        if on_epoch is not None:
            on_epoch(stats)
        if progress["bad_epochs"] >= cfg.patience:
            stopped_early = True

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if best_state is not None:
        unwrapped.load_state_dict(best_state)
    unwrapped.eval()
    history = [EpochStats(**h) for h in progress["history"]]
    return DistillResult(
        history,
        progress["best_epoch"],
        stopped_early,
        progress["step"],
        progress["tokens"],
        time.monotonic() - started,
    )


@dataclass(frozen=True)
class _Sched:
    learning_rate: float
    warmup_ratio: float
    min_lr_ratio: float
