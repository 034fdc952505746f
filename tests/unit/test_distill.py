import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stillhouse.common.config import KdSettings, RedistillSettings, Settings, TrainingSettings
from stillhouse.common.errors import UsageError
from stillhouse.rollout.distill.config import DistillConfig
from stillhouse.rollout.distill.losses import KDLossConfig
from stillhouse.rollout.distill.model import ModelShape, count_parameters, llama_config, new_model
from stillhouse.rollout.distill.training import (
    ConfigMismatchError,
    DistillExample,
    EpochStats,
    TrainingProgress,
    check_compatible,
    collate,
    train_student,
)

VOCAB = 32


def _tiny(vocab: int = VOCAB, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def _examples(n: int, k: int = 4) -> list[DistillExample]:
    """Prompt [a, b, 1], answer [a, 2]: the teacher copies the first token, then stops."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(3, VOCAB, (2,), generator=g))
        answer = (a, 2)
        tops = tuple((tok, *[t for t in range(3, 3 + k) if t != tok][: k - 1]) for tok in answer)
        lps = tuple((-0.05, *[-4.0] * (k - 1)) for _ in answer)
        out.append(DistillExample((a, b, 1, *answer), 3, tops, lps))
    return out


def test_collate_masks_the_positions_that_predict_answer_tokens():
    ex = _examples(2)
    batch = collate([ex[0], DistillExample((5, 6, 1, 7, 8, 2), 3)], pad_id=0, top_k=4)
    assert batch["input_ids"].shape == (2, 6)
    # logits at position i predict token i+1: the answer of ex[0] starts at index 3
    assert batch["mask"][0].tolist() == [False, False, True, True, False, False]
    assert batch["targets"][0][batch["mask"][0]].tolist() == list(ex[0].input_ids[3:])
    assert batch["targets"][1][batch["mask"][1]].tolist() == [7, 8, 2]
    assert batch["top_ids"][0, 2].tolist() == list(ex[0].top_ids[0])
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]


def test_vocabulary_mismatch_is_rejected_with_the_fix():
    class Tok:
        def __len__(self) -> int:
            return VOCAB

    with pytest.raises(ConfigMismatchError, match="teacher's tokenizer"):
        check_compatible(_tiny(VOCAB), Tok(), teacher=_tiny(VOCAB * 2))
    with pytest.raises(ConfigMismatchError, match="same vocab_size"):
        check_compatible(_tiny(VOCAB // 2), Tok())
    check_compatible(_tiny(VOCAB), Tok(), teacher=_tiny(VOCAB))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "gray"},
        {"epochs": 0},
        {"learning_rate": 0.0},
        {"mode": "grey-box", "kd": KDLossConfig(temperature=2.0)},
        {"weight_decay": -0.1},
        {"warmup_ratio": 1.0},
        {"min_lr_ratio": 1.5},
        {"batch_tokens": 32},
        {"grad_clip": 0.0},
        {"patience": 0},
    ],
)
def test_config_rejects_what_cannot_train(kwargs):
    with pytest.raises(ValueError):
        DistillConfig(**kwargs)


def test_config_from_settings_takes_every_training_and_kd_field():
    training = TrainingSettings(
        epochs=3,
        learning_rate=1e-3,
        warmup_ratio=0.1,
        min_lr_ratio=0.2,
        weight_decay=0.0,
        batch_tokens=512,
        grad_clip=0.5,
        patience=4,
        seed=9,
    )
    kd = KdSettings(divergence="jsd", alpha=0.7, beta=0.3, skew=0.2)
    settings = Settings(redistill=RedistillSettings(training=training, kd=kd))
    cfg = DistillConfig.from_settings(settings)
    assert cfg.mode == settings.redistill.teacher.targets
    for name, value in training.model_dump().items():
        assert getattr(cfg, name) == value, name
    assert cfg.kd == KDLossConfig(divergence="jsd", alpha=0.7, beta=0.3, skew=0.2)
    baseline = DistillConfig.from_settings(settings, sft_only=True)
    assert baseline.kd.alpha == 0.0
    assert baseline == DistillConfig(
        **{**cfg.__dict__, "kd": KDLossConfig(divergence="jsd", alpha=0.0, beta=0.3, skew=0.2)}
    )


def test_config_from_settings_turns_a_bad_combination_into_one_usage_line():
    # grey-box targets are top-k log-probabilities at temperature 1
    settings = Settings(redistill=RedistillSettings(kd=KdSettings(temperature=2.0)))
    with pytest.raises(UsageError, match=r"^redistill config: grey-box") as info:
        DistillConfig.from_settings(settings)
    assert "\n" not in str(info.value)
    # the SFT-only baseline has no KD term, so its temperature does not matter
    assert DistillConfig.from_settings(settings, sft_only=True).kd.alpha == 0.0


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


def test_new_model_is_the_shape_over_the_tokenizer_and_seeded():
    class Tok:
        eos_token_id, pad_token_id = 2, 0

        def __len__(self) -> int:
            return VOCAB

    shape = ModelShape(
        hidden_size=128, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1
    )
    config = llama_config(shape, Tok(), max_positions=48)
    a, b = new_model(config, seed=3), new_model(config, seed=3)
    assert config.vocab_size == VOCAB and config.num_key_value_heads == 1
    assert config.max_position_embeddings == 48 and config.tie_word_embeddings
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert count_parameters(a) == sum(p.numel() for p in a.parameters()) > 0


def test_progress_counts_epochs_since_the_best_held_out_kl():
    progress = TrainingProgress()
    assert progress.record(EpochStats(1, 2.0, 1.0, 0.5, 1e-3))
    assert not progress.record(EpochStats(2, 1.5, 1.1, 0.5, 1e-3))
    assert progress.record(EpochStats(3, 1.0, 0.9, 0.6, 1e-3))
    assert not progress.record(EpochStats(4, 0.9, float("nan"), 0.6, 1e-3))
    assert (progress.epoch, progress.best_epoch, progress.best_kl, progress.bad_epochs) == (
        4,
        3,
        0.9,
        1,
    )
    assert [e.epoch for e in progress.epochs()] == [1, 2, 3, 4]


def test_grey_box_distillation_lowers_held_out_kl(tmp_path):
    student = _tiny(seed=1)
    cfg = DistillConfig(mode="grey-box", epochs=4, learning_rate=1e-2, batch_tokens=256, patience=4)
    result = train_student(
        student, _examples(96), _examples(16), cfg, pad_id=0, run_dir=tmp_path, top_k=4
    )
    kls = [h.heldout_kl for h in result.history]
    assert len(kls) == 4
    assert min(kls) < 0.6 * kls[0]
    assert result.history[result.best_epoch - 1].heldout_kl == min(kls)
    assert result.train_tokens > 0


def test_a_rerun_resumes_after_the_last_finished_epoch(tmp_path):
    cfg1 = DistillConfig(epochs=1, learning_rate=1e-2, batch_tokens=256, patience=3)
    first = train_student(_tiny(seed=1), _examples(64), _examples(8), cfg1, 0, tmp_path, top_k=4)
    cfg2 = DistillConfig(epochs=2, learning_rate=1e-2, batch_tokens=256, patience=3)
    second = train_student(_tiny(seed=2), _examples(64), _examples(8), cfg2, 0, tmp_path, top_k=4)
    assert [h.epoch for h in second.history] == [1, 2]
    assert second.history[0] == first.history[0]  # epoch 1 was not trained again
    assert second.steps > first.steps


def test_a_written_job_trains_the_same_way_in_another_process(tmp_path):
    import subprocess
    import sys

    from stillhouse.rollout.distill.job import write_job

    cfg = DistillConfig(epochs=1, learning_rate=1e-2, batch_tokens=256)
    write_job(
        tmp_path,
        cfg,
        _examples(32),
        _examples(8),
        _tiny(seed=1),
        pad_id=0,
        top_k=4,
        teacher_dir=tmp_path,
        lora=None,
    )
    done = subprocess.run(
        [sys.executable, "-m", "stillhouse.rollout.distill.job", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "trained 1 epoch(s)" in done.stdout
    # in-process training of the same job resumes: nothing is trained twice
    import json

    job_steps = json.loads((tmp_path / "checkpoint" / "progress.json").read_text())["step"]
    again = train_student(_tiny(seed=1), _examples(32), _examples(8), cfg, 0, tmp_path, top_k=4)
    assert [h.epoch for h in again.history] == [1]
    assert again.steps == job_steps > 0


def test_distill_job_without_a_job_file_is_a_usage_line():
    from stillhouse.rollout.distill.job import main

    assert main([]) == 2


def test_white_box_distillation_uses_the_local_teacher_logits(tmp_path):
    teacher = _tiny(seed=7).eval()
    with torch.no_grad():  # a confident teacher: a near-uniform one leaves nothing to learn
        teacher.lm_head.weight.mul_(20)
    cfg = DistillConfig(
        mode="white-box", epochs=2, learning_rate=1e-2, batch_tokens=256, patience=2
    )
    result = train_student(
        _tiny(seed=1), _examples(48), _examples(8), cfg, 0, tmp_path, teacher=teacher
    )
    kls = [h.heldout_kl for h in result.history]
    assert kls[-1] < kls[0]  # the full-vocabulary KL to that teacher goes down


def test_lora_student_trains_only_adapters_and_saves_a_plain_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    from stillhouse.rollout.distill.student import LORA_TARGETS, save_for_serving

    base = _tiny(seed=1)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    student = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    cfg = DistillConfig(epochs=1, learning_rate=1e-2, batch_tokens=256)
    train_student(student, _examples(32), _examples(8), cfg, 0, tmp_path / "run", top_k=4)

    class Tok:
        eos_token_id, pad_token_id = 2, 0

        def save_pretrained(self, path: str) -> None:
            pass

    out = save_for_serving(student, Tok(), tmp_path / "model")
    merged = LlamaForCausalLM.from_pretrained(str(out))
    assert not any("lora" in k for k in merged.state_dict())
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, frozen[k])]
    assert changed, "the merged adapters changed the projection weights"
    assert all("proj" in k for k in changed)
