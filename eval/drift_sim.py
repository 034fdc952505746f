"""Simulated shadow traffic for deterministic drift tests and the drift benchmark: teacher and
student next-token distributions per position, the student's sampled answer, both sides'
log-probs of it (what a shadow record holds), all from one seeded numpy Generator.

    stream = simulate_stream(2000, SimStudent(), seed=3, change_at=1000,
                             after=SimStudent().worse(1.5))   # per-request k3, shape (2000,)

The generative model: docs/evaluation.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from stillhouse.common.traffic import ShadowRecord
from stillhouse.eval.divergence import k3_terms


@dataclass(frozen=True, slots=True)
class SimStudent:
    """A simulated student relative to its simulated teacher (see the module docstring)."""

    noise: float = 0.5
    vocab: int = 16
    teacher_scale: float = 3.0
    difficulty: float = 0.5
    mean_tokens: float = 12.0
    max_tokens: int = 64

    def __post_init__(self) -> None:
        if self.noise < 0 or self.difficulty < 0 or self.teacher_scale < 0:
            raise ValueError("noise, difficulty and teacher_scale must be >= 0")
        if self.vocab < 2 or self.max_tokens < 1 or self.mean_tokens < 1:
            raise ValueError("vocab must be >= 2, max_tokens >= 1 and mean_tokens >= 1")

    def worse(self, factor: float) -> SimStudent:
        """The same student with its logit noise scaled by `factor` (> 1: further from the
        teacher, as after a bad re-distillation or a quantisation regression)."""
        return replace(self, noise=self.noise * factor)


@dataclass(frozen=True, slots=True)
class _Batch:
    lengths: np.ndarray  # [n] tokens per request
    tokens: np.ndarray  # [T] sampled token per position, all requests concatenated
    student: np.ndarray  # [T, V] student log-softmax
    teacher: np.ndarray  # [T, V] teacher log-softmax

    def chosen(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(self.tokens.size)
        return self.student[rows, self.tokens], self.teacher[rows, self.tokens]


def _simulate(n: int, sim: SimStudent, rng: np.random.Generator) -> _Batch:
    if n < 0:
        raise ValueError(f"number of requests must be >= 0, got {n!r}")
    lengths = np.minimum(rng.geometric(1.0 / sim.mean_tokens, size=n), sim.max_tokens)
    total = int(lengths.sum())
    # Mean-one log-normal difficulty, so `noise` is the average scale whatever `difficulty` is.
    difficulty = rng.lognormal(-(sim.difficulty**2) / 2, sim.difficulty, size=n)
    scale = np.repeat(sim.noise * difficulty, lengths)[:, None]
    teacher = sim.teacher_scale * rng.standard_normal((total, sim.vocab))
    student = _log_softmax(teacher + scale * rng.standard_normal((total, sim.vocab)))
    teacher = _log_softmax(teacher)
    # Inverse-CDF sampling: one uniform per token (Gumbel-max would need one per vocab entry).
    cdf = np.cumsum(np.exp(student), axis=1)
    u = rng.random(total)[:, None] * cdf[:, -1:]
    tokens = np.minimum((cdf < u).sum(axis=1), sim.vocab - 1)
    return _Batch(lengths, tokens, student, teacher)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    # In place on a fresh array: half the memory traffic of scipy.special.log_softmax here.
    logits -= logits.max(axis=1, keepdims=True)
    logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logits


def _per_request_mean(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    if lengths.size == 0:
        return np.empty(0)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return np.add.reduceat(values, starts) / lengths


def simulate_divergences(n: int, sim: SimStudent, seed: int) -> np.ndarray:
    """Per-request k3 (per-token mean) of `n` simulated requests; the same numbers
    `request_divergence(...).k3` gives on `simulate_records(n, sim, seed)`."""
    batch = _simulate(n, sim, np.random.default_rng(seed))
    lp_s, lp_t = batch.chosen()
    return _per_request_mean(k3_terms(lp_s - lp_t), batch.lengths)


def simulate_stream(
    length: int,
    sim: SimStudent,
    seed: int,
    change_at: int | None = None,
    after: SimStudent | None = None,
) -> np.ndarray:
    """Per-request k3 of a stream of `length` requests; from index `change_at` on, `after`
    (e.g. ``sim.worse(1.5)``) serves instead of `sim`. Without a change point it is the same
    stream as ``simulate_divergences(length, sim, seed)``."""
    if change_at is None:
        return simulate_divergences(length, sim, seed)
    if after is None or not 0 <= change_at <= length:
        raise ValueError("a change point needs `after` and 0 <= change_at <= length")
    # Two independent sub-seeds: the pre-change part does not depend on what comes after.
    first, second = np.random.SeedSequence(seed).spawn(2)
    pre = _simulate(change_at, sim, np.random.default_rng(first))
    post = _simulate(length - change_at, after, np.random.default_rng(second))
    parts = []
    for batch in (pre, post):
        lp_s, lp_t = batch.chosen()
        parts.append(_per_request_mean(k3_terms(lp_s - lp_t), batch.lengths))
    return np.concatenate(parts)


def _top_maps(logprobs: np.ndarray, k: int) -> tuple[dict[int, float], ...]:
    best = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
    return tuple(
        {int(tok): float(row[tok]) for tok in toks}
        for row, toks in zip(logprobs, best, strict=True)
    )


def simulate_records(
    n: int,
    sim: SimStudent,
    seed: int,
    top_k: int | None = 5,
    student_top: bool = True,
    ts0: float = 0.0,
    dt: float = 1.0,
) -> list[ShadowRecord]:
    """`n` shadow records as the gateway would log them (`top_k=None`: no top-k lists;
    `top_k=sim.vocab`: full distributions). Request i has ``ts = ts0 + i·dt``."""
    batch = _simulate(n, sim, np.random.default_rng(seed))
    lp_s, lp_t = batch.chosen()
    records = []
    start = 0
    for i, length in enumerate(batch.lengths.tolist()):
        span = slice(start, start + length)
        start += length
        s_top = t_top = None
        if top_k is not None:
            t_top = _top_maps(batch.teacher[span], top_k)
            s_top = _top_maps(batch.student[span], top_k) if student_top else None
        records.append(
            ShadowRecord(
                request_id=f"sim-{seed}-{i}",
                ts=ts0 + i * dt,
                student_model=f"sim-noise-{sim.noise:g}",
                token_ids=tuple(batch.tokens[span].tolist()),
                student_logprobs=tuple(lp_s[span].tolist()),
                teacher_logprobs=tuple(lp_t[span].tolist()),
                student_top=s_top,
                teacher_top=t_top,
            )
        )
    return records
