"""Settings of the rollout (the `rollout:` section): calibration of the fallback threshold, the
gates, and the controller that walks a challenger through mirror → ramp → promote or roll back."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from stillhouse.common.section import Section as _Section


class CalibrationSettings(_Section):
    """`stillhouse calibrate`: pick the lowest confidence threshold (the largest student share)
    whose rate of unacceptable student-served answers is ≤ `epsilon` with probability
    ≥ 1 − `delta` (Learn-then-Test, fixed-sequence, exact binomial p-values).

    `risk`: "served" bounds the unacceptable share among the answers the student serves;
    "all" bounds unacceptable student answers as a share of all requests.
    `acceptable`: an answer is acceptable when it agrees with the teacher's answer to the same
    prompt ("teacher_match"), or when the judge grades it at least `min_judge_score` ("judge").
    `prompts_file` / `test_prompts_file`: JSONL prompt files (chat messages, plain prompts or
    demo tickets, as `redistill.data.source` reads them) to calibrate on and to check the
    threshold on, the first `holdout_size` of each; none (the default) takes the newest
    `2 × holdout_size` distinct prompts of the traffic log, split alternately.
    """

    epsilon: float = Field(default=0.1, gt=0.0, lt=1.0)
    delta: float = Field(default=0.1, gt=0.0, lt=1.0)
    risk: Literal["served", "all"] = "served"
    acceptable: Literal["teacher_match", "judge"] = "teacher_match"
    min_judge_score: int = Field(default=4, ge=1, le=5)
    holdout_size: int = Field(default=400, ge=20)
    max_candidates: int = Field(default=200, ge=2, le=10_000)
    # With risk "served", the walk starts at the first threshold serving enough answers that
    # this many errors could still be certified: one confidently wrong answer among the top
    # ~22 would otherwise end it at a tiny share (simulated median share 7 % vs 18 % with 2).
    # It depends on the scores only, never the labels, so the guarantee holds.
    start_errors: int = Field(default=2, ge=0, le=100)
    # Held-out prompts (JSONL, as `redistill.data.source`) to calibrate on and to check the
    # threshold on; the first `holdout_size` of each. None: the traffic log's newest prompts.
    prompts_file: Path | None = None
    test_prompts_file: Path | None = None
    max_tokens: int = Field(default=64, ge=1, le=4096)
    concurrency: int = Field(default=8, ge=1, le=256)
    prompts_file: Path | None = None
    test_prompts_file: Path | None = None

    @model_validator(mode="after")
    def _test_prompts_need_prompts(self) -> CalibrationSettings:
        if self.test_prompts_file is not None and self.prompts_file is None:
            raise ValueError("test_prompts_file is set but prompts_file is not: set both")
        return self


class GateSettings(_Section):
    """When a rollout step passes. Every gate needs `min_samples` before it may pass or fail;
    until then it is inconclusive."""

    min_samples: int = Field(default=40, ge=2)
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    # Challenger vs champion on the pairwise score against the teacher (+1 win, 0 tie, −1 loss):
    # not worse by more than this, by the always-valid (mSPRT) interval.
    noninferiority_margin: float = Field(default=0.1, ge=0.0, le=2.0)
    win_or_tie_bar: float = Field(default=0.8, ge=0.0, le=1.0)  # vs the teacher
    divergence_margin: float = Field(default=0.05, ge=0.0)  # mean k3 KL, nats per token
    fallback_margin: float = Field(default=0.05, ge=0.0, le=1.0)  # fallback-rate points
    latency_p99_ratio: float = Field(default=1.5, ge=1.0)  # challenger p99 ≤ champion p99 × this


class ControllerSettings(_Section):
    """The rollout controller (`stillhouse controller`, or inside `stillhouse up`)."""

    steps: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5)  # challenger shares, increasing
    # The mirror phase: this share of champion-arm requests is copied to the challenger (answers
    # no user sees) until `mirror_min_samples` of them are answered. The names before the
    # phase was called "mirror" (shadow_*) are still accepted.
    mirror_share: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        validation_alias=AliasChoices("mirror_share", "shadow_mirror_share"),
    )
    mirror_min_samples: int = Field(
        default=200, ge=1, validation_alias=AliasChoices("mirror_min_samples", "shadow_min_samples")
    )
    min_step_samples: int = Field(default=200, ge=1)  # challenger requests per ramp step
    min_step_s: float = Field(default=3600.0, ge=0.0)
    max_inconclusive_s: float = Field(default=86_400.0, gt=0.0)
    tick_s: float = Field(default=60.0, gt=0.0)
    # A journaled calibration still failing this long after its decision (the engine never
    # comes up: corrupt weights) is recorded as not certified, so the version is rolled back
    # rather than wedging the journal.
    calibrate_timeout_s: float = Field(default=1800.0, gt=0.0)
    gateway_url: str = "http://127.0.0.1:8000"
    judge_sample: int = Field(default=100, ge=1)  # judged requests per arm per evaluation
    # Its Prometheus endpoint (/metrics): the rollout's state and the batch jobs' gauges
    # (<state_dir>/metrics/*.prom). Port 0 turns it off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9401, ge=0, le=65535)

    @field_validator("steps")
    @classmethod
    def _increasing(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("at least one ramp step")
        if any(not 0.0 < s <= 1.0 for s in v):
            raise ValueError(f"every step is a share in (0, 1], got {list(v)}")
        if any(b <= a for a, b in pairwise(v)):
            raise ValueError(f"steps must increase, got {list(v)}")
        return v

    @field_validator("gateway_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"gateway_url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")


class RolloutSettings(_Section):
    calibration: CalibrationSettings = CalibrationSettings()
    gates: GateSettings = GateSettings()
    controller: ControllerSettings = ControllerSettings()
