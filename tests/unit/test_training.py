import itertools
import random

import pytest
import torch

from stillhouse.demo.examples import IGNORE_INDEX
from stillhouse.demo.teacher import (
    ModelShape,
    SftConfig,
    collate,
    lr_at,
    token_budget_batches,
    train_sft,
)


def _examples(lengths: list[int]) -> list[tuple[list[int], list[int]]]:
    return [([1] * n, [IGNORE_INDEX] * (n - 1) + [2]) for n in lengths]


def test_token_budget_batches_cover_every_example_once_within_budget():
    rng = random.Random(0)
    exs = _examples([rng.randint(5, 60) for _ in range(300)])
    batches = token_budget_batches(exs, batch_tokens=256, rng=random.Random(1))
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(300))
    for b in batches:
        assert len(b) == 1 or max(len(exs[i][0]) for i in b) * len(b) <= 256


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


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = SftConfig(learning_rate=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hidden_size": 64, "num_heads": 4, "head_dim": 16},  # vLLM CPU rejects head_dim 16
        {"hidden_size": 100, "num_heads": 2},
        {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 3},
    ],
)
def test_model_shape_rejects_what_vllm_cpu_cannot_serve(kwargs):
    base = {"intermediate_size": 64, "num_layers": 1, "num_kv_heads": 1, "head_dim": 64}
    with pytest.raises(ValueError):
        ModelShape(**{**base, **kwargs})


def test_sft_config_rejects_out_of_range_values():
    with pytest.raises(ValueError):
        SftConfig(epochs=0)
    with pytest.raises(ValueError):
        SftConfig(warmup_ratio=1.0)


def test_training_a_tiny_llama_lowers_the_loss_on_a_learnable_task():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                         max_position_embeddings=32)  # fmt: skip
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
