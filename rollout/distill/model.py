"""The Llama-architecture models distillation builds: a shape, its transformers config, a seeded
fresh model, and its parameter count. Shapes are checked against what vLLM's CPU build serves,
so a model built here always starts on the engines (the students here, the demo's teacher too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

# Head sizes vLLM's CPU attention supports (it rejects 16).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 256)


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
        if self.head_dim not in VLLM_CPU_HEAD_DIMS:
            raise ValueError(f"head_dim {self.head_dim} is not supported by vLLM's CPU attention")
        if self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError("hidden_size must equal num_heads * head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if min(self.intermediate_size, self.num_layers) < 1:
            raise ValueError("intermediate_size and num_layers must be positive")


def llama_config(
    shape: ModelShape, tokenizer: PreTrainedTokenizerBase, max_positions: int
) -> LlamaConfig:
    """A float32 Llama config of `shape` over `tokenizer`'s vocabulary, embeddings tied."""
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
    """A freshly initialised model; the same config and seed give the same weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
