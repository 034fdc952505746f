"""Distil a student from teacher targets: the training loop, held-out evaluation, checkpoints.

Read `train_student` top to bottom: examples → batches → (student forward, teacher forward in
white-box mode) → loss from `rollout/distill/losses.py` → clip → step → per-epoch held-out KL
and top-1 agreement → checkpoint → early stop. The loop runs through `accelerate`, so the same
code runs on one CPU here and under DDP or FSDP across GPUs and nodes:

    accelerate launch --multi_gpu --num_processes 8 -m stillhouse.rollout.distill.job JOB_DIR

Resuming: a checkpoint is written after every epoch (model, optimizer, progress); a run
started again with the same run directory continues after the last finished epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from stillhouse.common.errors import StillhouseError
from stillhouse.rollout.distill.batching import lr_at, token_budget_batches
from stillhouse.rollout.distill.config import DistillConfig
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
    top-k + tail estimate of `rollout/distill/losses.py` (a lower bound on the full KL); with
    text only it is the student's cross-entropy on the teacher's tokens (the KL up to the
    teacher's unknown entropy). Top-1 agreement compares the student's argmax with the
    teacher's token.
    """
    student.eval()
    kl_sum = agree = n = 0.0
    kl_cfg = KDLossConfig(alpha=1.0)
    lengths = [len(e.input_ids) for e in examples]
    for idx in token_budget_batches(lengths, batch_tokens, random.Random(0)):
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


@dataclass
class TrainingProgress:
    """What a checkpoint remembers between epochs (written as `progress.json`)."""

    epoch: int = 0  # the last finished epoch
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # EpochStats as dicts
    best_kl: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0  # finished epochs since the best one
    tokens: int = 0

    def record(self, stats: EpochStats) -> bool:
        """Add a finished epoch; True when its held-out KL is the lowest so far."""
        self.history.append(asdict(stats))
        self.epoch = stats.epoch
        if self.best_kl is None or stats.heldout_kl < self.best_kl:
            self.best_kl, self.best_epoch, self.bad_epochs = stats.heldout_kl, stats.epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def epochs(self) -> list[EpochStats]:
        return [EpochStats(**h) for h in self.history]


def _optimizer(student: torch.nn.Module, cfg: DistillConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices other than embeddings; frozen weights left out."""
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in student.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [
            {"params": [p for p in decay if p.requires_grad], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.requires_grad], "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
        betas=(0.9, 0.98),
    )


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    best: dict[str, torch.Tensor] | None,
    progress: TrainingProgress,
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "best": best},
        tmp / "state.pt",
    )
    (tmp / "progress.json").write_text(json.dumps(asdict(progress)))
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)  # an interrupted save never replaces a good checkpoint


def _load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[TrainingProgress, dict[str, torch.Tensor] | None]:
    """Load `path` into the model and optimizer; a fresh start when there is none."""
    if not (path / "progress.json").is_file():
        return TrainingProgress(), None
    saved = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return TrainingProgress(**json.loads((path / "progress.json").read_text())), saved["best"]


def _step(
    accelerator: Any,
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    cfg: DistillConfig,
    lr: float,
) -> float:
    """One optimizer step at learning rate `lr`; returns the batch's loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = batch_loss(model, teacher, batch, cfg)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach().item()


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
    at the end. Resumes from `run_dir/checkpoint` when one exists (its epochs are replayed to
    `on_epoch`, so the caller's record is whole). `on_step(step, total, loss)` reports."""
    from accelerate import Accelerator

    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator()
    model, optimizer = accelerator.prepare(student, _optimizer(student, cfg))
    if teacher is not None:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    lengths = [len(e.input_ids) for e in train]
    per_epoch = len(token_budget_batches(lengths, cfg.batch_tokens, random.Random(0)))
    per_epoch = max(1, per_epoch // accelerator.num_processes)
    total = per_epoch * cfg.epochs
    schedule = cfg.schedule

    ckpt = run_dir / "checkpoint"
    progress, best_state = _load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer)
    for done in progress.epochs():
        if on_epoch is not None:
            on_epoch(done)

    model.train()
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        if progress.bad_epochs >= cfg.patience:
            break  # early stop
        rng = random.Random(cfg.seed * 1000 + epoch)
        batches = token_budget_batches(lengths, cfg.batch_tokens, rng)
        mine = batches[accelerator.process_index :: accelerator.num_processes][:per_epoch]
        losses, lr = [], lr_at(progress.step, total, schedule)
        for idx in mine:
            lr = lr_at(progress.step, total, schedule)
            batch = collate([train[i] for i in idx], pad_id, top_k)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            losses.append(_step(accelerator, model, teacher, optimizer, batch, cfg, lr))
            progress.step += 1
            progress.tokens += int(batch["attention_mask"].sum())
            if on_step is not None:
                on_step(progress.step, total, losses[-1])

        kl, top1 = heldout_metrics(model, teacher, heldout, pad_id, top_k, cfg.batch_tokens)
        stats = EpochStats(epoch, sum(losses) / max(1, len(losses)), kl, top1, lr)
        if progress.record(stats):
            best_state = _state_copy(accelerator.unwrap_model(model))
        if accelerator.is_main_process:
            _save_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, best_state, progress)
        if on_epoch is not None:
            on_epoch(stats)

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if best_state is not None:
        unwrapped.load_state_dict(best_state)
    unwrapped.eval()
    return DistillResult(
        history=progress.epochs(),
        best_epoch=progress.best_epoch,
        stopped_early=progress.bad_epochs >= cfg.patience,
        steps=progress.step,
        train_tokens=progress.tokens,
        seconds=time.monotonic() - started,
    )
