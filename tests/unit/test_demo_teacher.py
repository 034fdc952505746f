"""The demo teacher's SFT loop (demo/teacher.py): collate, config ranges, and that it learns."""

import random

import pytest
import torch

from stillhouse.demo.examples import IGNORE_INDEX
from stillhouse.demo.teacher import SftConfig, collate, train_sft


def _examples(lengths: list[int]) -> list[tuple[list[int], list[int]]]:
    return [([1] * n, [IGNORE_INDEX] * (n - 1) + [2]) for n in lengths]


def test_collate_pads_inputs_masks_labels_and_attention():
    batch = collate(_examples([3, 5]), pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == [
        IGNORE_INDEX,
        IGNORE_INDEX,
        2,
        IGNORE_INDEX,
        IGNORE_INDEX,
    ]


def test_sft_config_rejects_out_of_range_values():
    with pytest.raises(ValueError):
        SftConfig(epochs=0)
    with pytest.raises(ValueError):
        SftConfig(warmup_ratio=1.0)
    with pytest.raises(ValueError):
        SftConfig(learning_rate=0.0)


def test_sft_config_schedule_is_its_learning_rate_fields():
    cfg = SftConfig(learning_rate=0.5, warmup_ratio=0.2, min_lr_ratio=0.3)
    assert (cfg.schedule.learning_rate, cfg.schedule.warmup_ratio) == (0.5, 0.2)
    assert cfg.schedule.min_lr_ratio == 0.3


def test_training_a_tiny_llama_lowers_the_loss_on_a_learnable_task():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    # the answer token copies the first token: learnable only by looking back
    rng = random.Random(0)
    exs = []
    for _ in range(64):
        first = rng.randint(3, 15)
        ids = [first, *[rng.randint(3, 15) for _ in range(4)], 1, first]
        exs.append((ids, [IGNORE_INDEX] * 6 + [first]))
    losses = train_sft(model, exs, SftConfig(epochs=25, learning_rate=3e-3, batch_tokens=128), 0)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
