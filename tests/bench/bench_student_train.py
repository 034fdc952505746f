"""Student training throughput: tokens per second of the distillation loop for SFT (CE on the
teacher's tokens), grey-box KD (top-k log-probabilities) and white-box KD (full teacher logits
from a local forward pass), side by side in one run, reported as ratios to SFT.

    .venv/bin/python tests/bench/bench_student_train.py [--device cuda] [--examples 400]

Synthetic examples with the demo world's shapes (prompt ~60 tokens, answer ~30, vocab 2048,
top-20), the demo student (0.69M parameters) and teacher (3.9M) shapes, random weights: the
loop's cost does not depend on what the weights know.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM

from stillhouse.rollout.distill.config import DistillConfig
from stillhouse.rollout.distill.losses import KDLossConfig
from stillhouse.rollout.distill.training import DistillExample, train_student

VOCAB, TOP_K = 2048, 20


def _model(hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    heads = hidden // 64
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=64,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg)


def _examples(n: int) -> list[DistillExample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        p = int(torch.randint(40, 80, (1,), generator=g))
        a = int(torch.randint(20, 40, (1,), generator=g))
        ids = tuple(int(x) for x in torch.randint(5, VOCAB, (p + a,), generator=g))
        tops = tuple(
            tuple(int(x) for x in torch.randperm(VOCAB, generator=g)[:TOP_K]) for _ in range(a)
        )
        lps = tuple(tuple(float(x) for x in torch.linspace(-0.1, -9.0, TOP_K)) for _ in range(a))
        out.append(DistillExample(ids, p, tops, lps))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=400)
    args = parser.parse_args()
    data = _examples(args.examples)
    heldout = data[:16]
    variants = {
        "SFT (CE only)": (
            DistillConfig(mode="grey-box", epochs=1, kd=KDLossConfig(alpha=0.0)),
            None,
        ),
        "grey-box KD (top-20)": (DistillConfig(mode="grey-box", epochs=1), None),
        "white-box KD (teacher forward)": (
            DistillConfig(mode="white-box", epochs=1),
            _model(256, 4, seed=9).eval(),
        ),
    }
    rows = []
    for name, (cfg, teacher) in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            result = train_student(
                _model(128, 2, seed=1),
                data,
                heldout,
                cfg,
                0,
                Path(tmp),
                teacher=teacher,
                top_k=TOP_K if teacher is None else 0,
            )
            seconds = time.monotonic() - started
        rows.append((name, result.train_tokens, seconds))
    base = rows[0][1] / rows[0][2]
    table = Table(title=f"student training throughput ({args.examples} examples, 1 epoch each)")
    for col in ("variant", "tokens", "seconds", "tokens/s", "vs SFT"):
        table.add_column(col, justify="right")
    for name, tokens, seconds in rows:
        rate = tokens / seconds
        table.add_row(name, str(tokens), f"{seconds:.1f}", f"{rate:,.0f}", f"{rate / base:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
