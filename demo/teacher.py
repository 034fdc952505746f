"""Supervised training of the demo teacher from scratch: a loop you can read top to bottom.

Batches are packed by a token budget over length-sorted examples (little padding), the loss
covers answer tokens only, the schedule is linear warmup then cosine decay, gradients are
clipped, and every random choice is seeded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from stillhouse.demo.examples import IGNORE_INDEX

Example = tuple[list[int], list[int]]


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture shape. head_dim 64: vLLM's CPU attention rejects 16."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 64

    def __post_init__(self) -> None:
        if self.head_dim not in (32, 64, 80, 96, 112, 128, 256):
            raise ValueError(f"head_dim {self.head_dim} is not supported by vLLM's CPU attention")
        if self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError("hidden_size must equal num_heads * head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if min(self.intermediate_size, self.num_layers) < 1:
            raise ValueError("intermediate_size and num_layers must be positive")


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
        if self.epochs <= 0 or self.learning_rate <= 0 or self.batch_tokens < 64:
            raise ValueError("epochs, learning_rate must be > 0 and batch_tokens >= 64")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")


def llama_config(
    shape: ModelShape, tokenizer: PreTrainedTokenizerBase, max_positions: int
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def token_budget_batches(
    examples: list[Example], batch_tokens: int, rng: random.Random
) -> list[list[int]]:
    """Indices grouped so that (longest example x batch size) stays within `batch_tokens`."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = len(examples[i][0])  # sorted ascending: the newest is the longest
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


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


def lr_at(step: int, total: int, cfg: SftConfig) -> float:
    warmup = max(1, int(total * cfg.warmup_ratio))
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + (cfg.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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
    batches_per_epoch = len(token_budget_batches(examples, cfg.batch_tokens, random.Random(0)))
    total = max(1, int(batches_per_epoch * cfg.epochs))
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
        for batch_idx in token_budget_batches(examples, cfg.batch_tokens, rng):
            if step >= total:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg)
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
