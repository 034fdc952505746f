"""Settings of the evaluation commands (`stillhouse judge | drift | ab | report`): the
`evaluation:` section of the config, kept apart from `config.py` to keep each module small."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from stillhouse.common.section import Section as _Section

DEFAULT_RUBRIC = (
    "Grade the answer to the user's request from 1 to 5: 5 fully correct and helpful, "
    "4 correct with a minor flaw, 3 partly correct, 2 mostly wrong, 1 wrong or unusable."
)


class JudgeSettings(_Section):
    """The LLM judge: any OpenAI-compatible endpoint. No `base_url`: the demo teacher, served by
    vLLM for the job. The key comes from the environment variable named by `api_key_env`."""

    base_url: str | None = None
    model: str = "teacher"
    api_key_env: str | None = None
    template: Literal["demo", "rubric"] = "demo"  # demo: the demo teacher's trained formats
    rubric: str = DEFAULT_RUBRIC
    concurrency: int = Field(default=8, ge=1, le=256)
    timeout_s: float = Field(default=60.0, gt=0)
    max_parse_retries: int = Field(default=2, ge=0, le=10)
    max_tokens: int = Field(default=96, ge=8, le=4096)
    structured_output: bool = True  # response_format with a JSON schema (vLLM supports it)
    sample_per_arm: int = Field(default=100, ge=1)
    pairwise: bool = True  # also compare each answer with the teacher's, both orders

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {v!r}")
        return v


class DriftSettings(_Section):
    """Drift of per-request divergence (k3 estimate of KL(student || teacher)): the first
    `reference_size` shadow records of a student are its reference, unless promotion set one."""

    reference_size: int = Field(default=150, ge=20)
    min_current: int = Field(default=30, ge=5)
    false_alarm_rate: float = Field(default=0.01, gt=0.0, lt=0.5)
    warn_alpha: float = Field(default=0.01, gt=0.0, lt=0.5)
    drift_alpha: float = Field(default=0.001, gt=0.0, lt=0.5)
    psi_warn: float = Field(default=0.1, gt=0.0)
    psi_drift: float = Field(default=0.25, gt=0.0)
    # Divergence-over-time resolution; None: a twentieth of the window's span.
    bucket_s: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> DriftSettings:
        if self.drift_alpha > self.warn_alpha:
            raise ValueError("drift_alpha must not exceed warn_alpha")
        if self.psi_drift < self.psi_warn:
            raise ValueError("psi_drift must not be below psi_warn")
        return self


class AbTestSettings(_Section):
    """A/B statistics: the sequential test's level, the MDE's power, the SRM alarm level."""

    alpha: float = Field(default=0.05, gt=0.0, lt=0.5)
    power: float = Field(default=0.8, gt=0.5, lt=1.0)
    min_samples: int = Field(default=30, ge=2)
    srm_alpha: float = Field(default=0.001, gt=0.0, lt=0.5)
    # The mSPRT's mixing scale: the effect size (in judge-score points) worth detecting.
    effect_of_interest: float = Field(default=0.2, gt=0.0)


class PriceSettings(_Section):
    """What one model's tokens cost: per 1k tokens (prompt and completion), or per GPU-hour at a
    measured throughput (total tokens per second per GPU). See `stillhouse.eval.cost`."""

    prompt_per_1k: float | None = Field(default=None, ge=0.0)
    completion_per_1k: float | None = Field(default=None, ge=0.0)
    gpu_hour: float | None = Field(default=None, ge=0.0)
    tokens_per_s_per_gpu: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _one_mode(self) -> PriceSettings:
        per_token = (self.prompt_per_1k, self.completion_per_1k)
        per_gpu = (self.gpu_hour, self.tokens_per_s_per_gpu)
        if any(v is not None for v in per_token) == any(v is not None for v in per_gpu):
            raise ValueError("set per-1k-token prices or GPU-hour pricing, exactly one of the two")
        if None in per_token and None in per_gpu:
            raise ValueError(
                "per-1k pricing needs prompt_per_1k and completion_per_1k; GPU-hour pricing "
                "needs gpu_hour and tokens_per_s_per_gpu"
            )
        return self


def _default_prices() -> dict[str, PriceSettings]:
    # Illustrative list prices: a large teacher costs ~20x a small student per token.
    return {
        "teacher": PriceSettings(prompt_per_1k=0.5, completion_per_1k=1.5),
        "champion": PriceSettings(prompt_per_1k=0.025, completion_per_1k=0.075),
        "challenger": PriceSettings(prompt_per_1k=0.025, completion_per_1k=0.075),
    }


class EvaluationSettings(_Section):
    """`stillhouse judge | drift | ab | report` over the traffic log."""

    judge: JudgeSettings = JudgeSettings()
    drift: DriftSettings = DriftSettings()
    ab: AbTestSettings = AbTestSettings()
    prices: dict[str, PriceSettings] = Field(default_factory=_default_prices)
    window_hours: float | None = Field(default=24.0, gt=0)  # None: the whole log

    @field_validator("prices")
    @classmethod
    def _roles(cls, v: dict[str, PriceSettings]) -> dict[str, PriceSettings]:
        unknown = sorted(set(v) - {"teacher", "champion", "challenger"})
        if unknown:
            raise ValueError(f"prices for unknown roles {unknown}: use teacher/champion/challenger")
        return v
