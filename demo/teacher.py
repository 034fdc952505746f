"""Supervised training of the demo teacher from scratch: a loop you can read top to bottom.

Batches are packed by a token budget over length-sorted examples (little padding), the loss
covers answer tokens only, the schedule is linear warmup then cosine decay, gradients are
clipped, and every random choice is seeded. The batcher, the schedule and the model builders
are production distillation's (`rollout/distill/batching.py`, `rollout/distill/model.py`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM

from stillhouse.demo.examples import IGNORE_INDEX
from stillhouse.rollout.distill.batching import LrSchedule, lr_at, token_budget_batches

Example = tuple[list[int], list[int]]


@dataclass(frozen=True)
class SftConfig:
    epochs: float = 3.0
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    batch_tokens: int = 4096
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_tokens < 64:
            raise ValueError("epochs must be > 0 and batch_tokens >= 64")
        _ = self.schedule  # LrSchedule checks learning_rate, warmup_ratio and min_lr_ratio

    @property
    def schedule(self) -> LrSchedule:
        return LrSchedule(self.learning_rate, self.warmup_ratio, self.min_lr_ratio)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def train_sft(
    model: LlamaForCausalLM,
    examples: list[Example],
    cfg: SftConfig,
    pad_id: int,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Train in place; returns the loss of every step. `on_step(step, total, loss)` reports."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    lengths = [len(ids) for ids, _ in examples]
    batches_per_epoch = len(token_budget_batches(lengths, cfg.batch_tokens, random.Random(0)))
    total = max(1, int(batches_per_epoch * cfg.epochs))
    schedule = cfg.schedule
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.learning_rate,
        betas=(0.9, 0.98),
    )
    model.train()
    losses: list[float] = []
    step = 0
    while step < total:
        for batch_idx in token_budget_batches(lengths, cfg.batch_tokens, rng):
            if step >= total:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, schedule)
            batch = collate([examples[i] for i in batch_idx], pad_id)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if on_step is not None:
                on_step(step, total, losses[-1])
    model.eval()
    return losses
