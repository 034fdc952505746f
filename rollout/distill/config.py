"""How a student is trained: `DistillConfig`, and the one place settings become one.

`DistillConfig.from_settings(settings)` reads the `redistill:` section (targets mode, the
`training:` fields, the `kd:` loss); `sft_only=True` gives the SFT-only baseline (alpha 0).
Every field's range is checked when the config is made, before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from stillhouse.common.errors import UsageError
from stillhouse.rollout.distill.batching import LrSchedule
from stillhouse.rollout.distill.losses import KDLossConfig

if TYPE_CHECKING:
    from stillhouse.common.config import Settings

TargetMode = Literal["black-box", "grey-box", "white-box"]
TARGET_MODES: tuple[str, ...] = ("black-box", "grey-box", "white-box")


@dataclass(frozen=True)
class DistillConfig:
    """How to train. `__post_init__` rejects values that cannot work, before the first step.

    Attributes:
        mode: which teacher targets train the student: ``black-box`` (its text: CE only),
            ``grey-box`` (its top-k log-probabilities) or ``white-box`` (its full logits from
            a local forward pass).
        epochs: at most this many passes over the training examples (>= 1).
        learning_rate, warmup_ratio, min_lr_ratio: the warmup + cosine schedule
            (:class:`~stillhouse.rollout.distill.batching.LrSchedule`); learning_rate in (0, 1].
        weight_decay: AdamW's, on matrices other than embeddings (>= 0).
        batch_tokens: the padded token budget of one batch (>= 64).
        grad_clip: the gradient-norm clip (> 0).
        patience: stop after this many epochs without a lower held-out KL (>= 1).
        seed: seeds the model's dropout and the batch order.
        kd: the loss (:class:`~stillhouse.rollout.distill.losses.KDLossConfig`).
    """

    mode: TargetMode = "grey-box"
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
        if self.mode not in TARGET_MODES:
            raise ValueError(f"mode must be black-box, grey-box or white-box, not {self.mode!r}")
        if self.epochs < 1 or self.patience < 1 or self.batch_tokens < 64:
            raise ValueError("epochs and patience must be >= 1 and batch_tokens >= 64")
        if not 0 < self.learning_rate <= 1 or self.grad_clip <= 0:
            raise ValueError("learning_rate must be in (0, 1] and grad_clip > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        _ = self.schedule  # LrSchedule checks warmup_ratio and min_lr_ratio
        if self.mode == "grey-box" and self.kd.temperature != 1.0 and self.kd.alpha > 0:
            raise ValueError(
                "grey-box targets are top-k log-probabilities at temperature 1: set "
                "kd.temperature to 1, or use white-box targets for another temperature"
            )

    @property
    def schedule(self) -> LrSchedule:
        return LrSchedule(self.learning_rate, self.warmup_ratio, self.min_lr_ratio)

    @classmethod
    def from_settings(cls, settings: Settings, *, sft_only: bool = False) -> DistillConfig:
        """The run's training config (`sft_only`: the alpha-0 baseline). A combination the
        settings' own validation cannot judge alone is one `UsageError` line."""
        rs = settings.redistill
        kd = {**rs.kd.model_dump(), "alpha": 0.0 if sft_only else rs.kd.alpha}
        try:
            return cls(mode=rs.teacher.targets, kd=KDLossConfig(**kd), **rs.training.model_dump())
        except ValueError as e:
            raise UsageError(f"redistill config: {e}") from None
