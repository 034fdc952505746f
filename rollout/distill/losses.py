"""Knowledge-distillation losses: pure functions of tensors, importing only torch.

    loss = alpha * T² * KD(teacher_T, student_T) + (1 - alpha) * CE(student, target_ids)

averaged over the answer tokens (`mask`). `kd_loss` takes the teacher's full logits (white-box),
`sparse_kd_loss` its top-k log-probabilities plus a tail bucket (grey-box, as vLLM returns
them); `divergence` is forward KL, reverse KL, generalised JSD or skew KL (`KDLossConfig`).
Both losses walk over chunks of tokens and build the gradient as they go (one [tokens × vocab]
buffer, or none with `inplace_grad`). The definitions, the tail bucket's bounds and the
in-place conditions are in docs/distillation.md ("The loss").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_kl")

# Auto chunk: about this many elements per float32 temporary (64 MiB on CUDA, big enough to
# amortise kernel launches; 1 MiB on CPU, where small chunks stay in cache and run faster).
_CHUNK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 18}

# A chunk is (sequence b, first token, end token); rows_fn(chunk, with_grad) returns the chunk's
# loss and its [tokens, V] gradient (None when not asked for).
Chunk = tuple[int, int, int]
RowsFn = Callable[[Chunk, bool], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class KDLossConfig:
    """Settings of the distillation loss; ``__post_init__`` rejects out-of-range values.

    Attributes:
        divergence: ``forward_kl`` | ``reverse_kl`` | ``jsd`` | ``skew_kl``
            (docs/distillation.md, "Divergences").
        beta: JSD interpolation in [0, 1]; 0 → forward KL, 1 → reverse KL (TRL convention).
        skew: DistiLLM skew a in [0, 1] for ``skew_kl``; 0 → forward KL, 1 → 0.
        temperature: T > 0 applied to both logit sets; the KD term is multiplied by T².
        alpha: weight of the KD term in [0, 1]; 1 - alpha weighs CE on ``target_ids``.
        chunk_size: tokens per chunk; None picks one from the vocabulary size and device.
        sparse_tail_floor: ε in [0, 1), the least mass given to the teacher's tail bucket.
        inplace_grad: write the gradient into ``student_logits`` itself instead of a separate
            [tokens × vocab] buffer; the logits are then overwritten. Read the conditions in
            docs/distillation.md ("In-place gradient") before turning it on.
    """

    divergence: Divergence = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    temperature: float = 1.0
    alpha: float = 1.0
    chunk_size: int | None = None
    sparse_tail_floor: float = 1e-6
    inplace_grad: bool = False

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        for name in ("beta", "skew", "alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if self.chunk_size is not None and (
            type(self.chunk_size) is not int or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be an int >= 1 or None, got {self.chunk_size!r}")
        if not 0.0 <= self.sparse_tail_floor < 1.0:
            raise ValueError(f"sparse_tail_floor must be in [0, 1), got {self.sparse_tail_floor}")
        if type(self.inplace_grad) is not bool:
            raise ValueError(f"inplace_grad must be a bool, got {self.inplace_grad!r}")


def _wlog_ratio(w: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ w·(log a − log b) over the last dim, with 0·log 0 = 0 (NaN-free under autograd too)."""
    return (w * torch.where(w > 0, log_a - log_b, 0.0)).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p·p + (1 − weight_p)·q), computed in log space."""
    if weight_p == 0.0:
        return log_q
    if weight_p == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def _divergence_and_dlogq(
    log_p: torch.Tensor, log_q: torch.Tensor, config: KDLossConfig, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row D(p, q) and, if asked, h = ∂D/∂log q with q's entries treated as free.

    The gradient w.r.t. logits s (q = softmax(s)) then follows as h − q·Σh; for q an
    aggregation of a softmax (the sparse tail) see :func:`sparse_kd_loss`.
    """
    kind, h = config.divergence, None
    if (kind == "jsd" and config.beta == 0.0) or (kind == "skew_kl" and config.skew == 0.0):
        kind = "forward_kl"
    elif kind == "jsd" and config.beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        p = log_p.exp()
        loss = _wlog_ratio(p, log_p, log_q)
        if with_grad:
            h = p.neg_()
    elif kind == "reverse_kl":
        q = log_q.exp()
        loss = _wlog_ratio(q, log_q, log_p)
        if with_grad:
            h = q * (torch.where(q > 0, log_q - log_p, 0.0) + 1.0)
    elif kind == "jsd":
        beta, p, q = config.beta, log_p.exp(), log_q.exp()
        log_m = _log_mix(log_p, log_q, beta)
        loss = beta * _wlog_ratio(p, log_p, log_m) + (1 - beta) * _wlog_ratio(q, log_q, log_m)
        if with_grad:  # ∂/∂q of both terms collapses to (1−β)·log(q/m)
            h = (1 - beta) * q * torch.where(q > 0, log_q - log_m, 0.0)
    else:  # skew_kl
        a, p = config.skew, log_p.exp()
        log_m = _log_mix(log_p, log_q, a)
        loss = _wlog_ratio(p, log_p, log_m)
        if with_grad:  # ∂D/∂q = −(1−a)·p/m
            h = -(1 - a) * torch.where(p > 0, (log_p + log_q - log_m).exp(), 0.0)
    return loss, h


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, config: KDLossConfig) -> torch.Tensor:
    """Per-row divergence between teacher log-probs ``log_p`` and student log-probs ``log_q``.

    Both are normalised log-distributions over the last dim; returns shape ``log_p.shape[:-1]``.
    Differentiable with plain autograd (this is what the straightforward loss would use).
    """
    return _divergence_and_dlogq(log_p, log_q, config, with_grad=False)[0]


def _ce_rows(
    log_q1: torch.Tensor, target: torch.Tensor, weight: float, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """weight·Σ CE over the chunk's rows and weight·(softmax − onehot), given log_softmax."""
    column = target.long().unsqueeze(1)
    loss = -log_q1.gather(1, column).sum() * weight
    if not with_grad:
        return loss, None
    grad = log_q1.exp().mul_(weight)
    grad.scatter_add_(1, column, torch.full_like(column, -weight, dtype=grad.dtype))
    return loss, grad


class _ChunkedLoss(torch.autograd.Function):
    """A scalar loss whose gradient w.r.t. ``logits`` is built chunk by chunk in forward.

    ``grad_mode``: None (no gradient), ``"buffer"`` (a new [B, T, V] tensor) or ``"inplace"``
    (``logits``' own storage; each chunk's rows are read before they are overwritten).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        rows_fn: RowsFn,
        chunks: list[Chunk],
        compute_dtype: torch.dtype,
        grad_mode: str | None,
    ) -> torch.Tensor:
        grad = None
        if grad_mode is not None:
            grad = logits.detach() if grad_mode == "inplace" else torch.empty_like(logits)
            for b, start, end in _uncovered(chunks, *logits.shape[:2]):
                grad[b, start:end].zero_()  # tokens outside every chunk (masked out)
        total = torch.zeros((), dtype=compute_dtype, device=logits.device)
        for chunk in chunks:
            loss, chunk_grad = rows_fn(chunk, grad is not None)
            total += loss
            if grad is not None and chunk_grad is not None:
                b, start, end = chunk
                grad[b, start:end].copy_(chunk_grad)  # casts to the logits' dtype
        ctx.grad = grad  # dropped in backward: were it still referenced, .grad would be a copy
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "the chunked KD loss hands its gradient buffer over on the first backward; "
                "it cannot be backpropagated twice (retain_graph re-runs are not supported)"
            )
        grad.mul_(grad_output.to(grad.dtype))  # in place: no second [tokens × vocab] copy
        return grad, None, None, None, None


def _uncovered(chunks: list[Chunk], batch: int, seq: int) -> list[Chunk]:
    """Token ranges outside every chunk. Raises if two chunks share a token: written in place,
    one chunk's gradient would be read as logits by the other."""
    gaps, b_prev, t_prev = [], 0, 0
    for b, start, end in [*sorted(chunks), (batch, 0, 0)]:
        if b != b_prev:  # close sequence b_prev; sequences strictly between have no chunk
            gaps += [(b_prev, t_prev, seq)] + [(s, 0, seq) for s in range(b_prev + 1, b)]
            b_prev, t_prev = b, 0
        if start < t_prev:
            raise AssertionError(f"chunks overlap at sequence {b}, token {start}")
        gaps.append((b, t_prev, start))
        t_prev = max(t_prev, end)
    return [(b, start, end) for b, start, end in gaps if end > start]


def _chunks(mask: torch.Tensor | None, batch: int, seq: int, chunk: int) -> list[Chunk]:
    """Token ranges of at most ``chunk`` tokens, within one sequence, covering the True tokens.

    Ranges make every chunk a view (no gather copy; no copy either for logits sliced along the
    sequence, as in ``logits[:, prompt_len - 1 : -1]``); an answer mask has one run a sequence.
    """
    if mask is None:
        runs = [(b, 0, seq) for b in range(batch)]
    else:  # +1 / −1 where a run of True starts / ends
        edges = F.pad(mask.to(device="cpu", dtype=torch.int8), (1, 1)).diff(dim=1)
        starts, ends = (edges == 1).nonzero().tolist(), (edges == -1).nonzero().tolist()
        runs = [(b, t0, t1) for (b, t0), (_, t1) in zip(starts, ends, strict=True)]
    return [(b, s, min(s + chunk, t1)) for b, t0, t1 in runs for s in range(t0, t1, chunk)]


def _prepare(
    student_logits: torch.Tensor,
    mask: torch.Tensor | None,
    target_ids: torch.Tensor | None,
    config: KDLossConfig,
    teacher: torch.Tensor,
) -> tuple[torch.Tensor, list[Chunk], int, torch.Tensor | None, torch.dtype, str | None]:
    """As [B, T, V] (a view); return logits, chunks, counted tokens, [B, T] targets, math dtype
    and the gradient mode of :class:`_ChunkedLoss`."""
    if student_logits.dim() not in (2, 3) or not student_logits.is_floating_point():
        raise ValueError("student_logits must be a float tensor [B, T, V] or [N, V]")
    lead = student_logits.shape[:-1]
    if mask is not None and mask.shape != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logits' leading {tuple(lead)}")
    if config.alpha < 1.0 and (target_ids is None or target_ids.shape != lead):
        raise ValueError("alpha < 1 needs target_ids shaped like the logits' leading dims")
    grad_mode = _grad_mode(student_logits, config, teacher)
    logits = _batched(student_logits, 3)
    batch, seq, vocab = logits.shape
    chunk = config.chunk_size or max(1, _CHUNK_ELEMENTS.get(logits.device.type, 1 << 18) // vocab)
    chunks = _chunks(None if mask is None else _batched(mask, 2), batch, seq, chunk)
    n_tokens = sum(end - start for _, start, end in chunks)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    targets = None if target_ids is None else _batched(target_ids, 2)
    return logits, chunks, n_tokens, targets, dtype, grad_mode


def _grad_mode(logits: torch.Tensor, config: KDLossConfig, teacher: torch.Tensor) -> str | None:
    """None, "buffer" or "inplace"; ValueError where in-place writing cannot work (the
    conditions are in docs/distillation.md, "In-place gradient")."""
    if not torch.is_grad_enabled():
        return None
    if not config.inplace_grad:
        return "buffer" if logits.requires_grad else None
    if not logits.requires_grad:
        raise ValueError(
            "inplace_grad=True needs student_logits that require grad: the gradient is written "
            "into them (under torch.no_grad() the loss alone is computed and nothing is written)"
        )
    if not logits.is_contiguous():
        raise ValueError(
            "inplace_grad=True needs contiguous student_logits; a strided slice of bigger logits "
            "gets a full-size gradient from its view's backward anyway: pass the whole logits "
            "with a mask, or use inplace_grad=False"
        )
    if teacher.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
        raise ValueError(
            "inplace_grad=True: the teacher tensor shares storage with student_logits, which are "
            "overwritten chunk by chunk; pass a copy or use inplace_grad=False"
        )
    return "inplace"


def _batched(x: torch.Tensor, dims: int) -> torch.Tensor:
    """``x`` with a leading batch dim of 1 added when it has ``dims - 1`` dims (a view)."""
    return x if x.dim() == dims else x.unsqueeze(0)


def _log_softmax(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    if temperature == 1.0:
        return F.log_softmax(logits, dim=-1, dtype=dtype)
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    config: KDLossConfig | None = None,
) -> torch.Tensor:
    """Chunked ``alpha·T²·KD + (1−alpha)·CE``, mean over tokens where ``mask`` is True.

    Args:
        student_logits: [B, T, V] or [N, V], any float dtype; receives the gradient (with
            ``config.inplace_grad`` it is overwritten by it: see docs/distillation.md,
            "In-place gradient").
        teacher_logits: same shape as ``student_logits``; never differentiated.
        mask: [B, T] (or [N]) bool or 0/1, True where a token counts; None counts every token.
        target_ids: token ids (the teacher's sampled tokens) for CE; needed when alpha < 1.
        config: see :class:`KDLossConfig`.

    Returns:
        A scalar tensor (float32, float64 for float64 logits).
    """
    config = config or KDLossConfig()
    if teacher_logits.shape != student_logits.shape:
        raise ValueError("teacher_logits must have the student logits' shape")
    logits, chunks, n, targets, dtype, grad_mode = _prepare(
        student_logits, mask, target_ids, config, teacher_logits
    )
    teacher = _batched(teacher_logits.detach(), 3)
    temp, alpha = config.temperature, config.alpha

    def rows_fn(chunk: Chunk, with_grad: bool):
        b, start, end = chunk
        z = logits.detach()[b, start:end]
        log_q = _log_softmax(z, temp, dtype)
        loss, grad = torch.zeros((), dtype=dtype, device=z.device), None
        if alpha > 0.0:
            log_p = _log_softmax(teacher[b, start:end], temp, dtype)
            kd, h = _divergence_and_dlogq(log_p, log_q, config, with_grad)
            del log_p
            loss = kd.sum() * (alpha * temp * temp / n)
            if h is not None:  # d(T²·KD)/dz = T·(h − q·Σh)
                grad = h.sub_(log_q.exp().mul_(h.sum(-1, keepdim=True))).mul_(alpha * temp / n)
        if alpha < 1.0:
            log_q1 = log_q if temp == 1.0 else _log_softmax(z, 1.0, dtype)
            ce, ce_grad = _ce_rows(log_q1, targets[b, start:end], (1 - alpha) / n, with_grad)
            loss = loss + ce
            grad = ce_grad if grad is None else grad.add_(ce_grad)
        return loss, grad

    return _ChunkedLoss.apply(logits, rows_fn, chunks, dtype, grad_mode)


def teacher_bucket_log_probs(
    topk_logprobs: torch.Tensor, vocab_size: int, tail_floor: float
) -> torch.Tensor:
    """The teacher's log-distribution over its K top-k ids plus the tail bucket (if K < V).

    Returns [..., K+1] (or [..., K] when K = V, renormalised): the tail r = max(1 − Σ p_k,
    ``tail_floor``), all K+1 renormalised (docs/distillation.md, "Sparse teacher").
    """
    if topk_logprobs.shape[-1] == vocab_size:
        return topk_logprobs - torch.logsumexp(topk_logprobs, dim=-1, keepdim=True)
    mass = topk_logprobs.exp().sum(-1, keepdim=True)
    tail = (1.0 - mass).clamp_min(tail_floor)
    log_buckets = torch.cat([topk_logprobs, tail.log()], dim=-1)
    return log_buckets - (mass + tail).log()


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    config: KDLossConfig | None = None,
) -> torch.Tensor:
    """Chunked KD against a top-k teacher, over K+1 buckets (top-k ids + tail), plus CE.

    Args:
        student_logits: [B, T, V] or [N, V]; as in :func:`kd_loss` (``inplace_grad`` included).
        teacher_topk_ids: [B, T, K] (or [N, K]) distinct token ids per position.
        teacher_topk_logprobs: their log-probabilities at temperature 1 over the full vocab.
        mask, target_ids, config: as in :func:`kd_loss`; ``config.temperature`` must be 1.

    The tail bucket, its floor and what the result equals (a lower bound on the dense loss
    while the floor is inactive) are in docs/distillation.md, "Sparse teacher".
    """
    config = config or KDLossConfig()
    if config.temperature != 1.0:
        raise ValueError("sparse_kd_loss needs temperature 1: top-k logprobs cannot be re-tempered")
    lead = student_logits.shape[:-1]
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape or teacher_topk_ids.shape[:-1] != lead:
        raise ValueError("teacher top-k ids and logprobs must both be [*student_leading_dims, K]")
    logits, chunks, n, targets, dtype, grad_mode = _prepare(
        student_logits, mask, target_ids, config, teacher_topk_logprobs
    )
    vocab, k = logits.shape[-1], teacher_topk_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"need 1 <= K <= vocab size, got K={k}, V={vocab}")
    ids_all = _batched(teacher_topk_ids, 3).long()
    lp_all = _batched(teacher_topk_logprobs.detach(), 3)
    alpha, has_tail = config.alpha, k < vocab

    def rows_fn(chunk: Chunk, with_grad: bool):
        b, start, end = chunk
        log_q = _log_softmax(logits.detach()[b, start:end], 1.0, dtype)
        ids = ids_all[b, start:end]
        loss, grad = torch.zeros((), dtype=dtype, device=log_q.device), None
        if alpha > 0.0:
            log_p = teacher_bucket_log_probs(
                lp_all[b, start:end].to(dtype), vocab, config.sparse_tail_floor
            )
            log_qk = log_q.gather(1, ids)
            log_qb = log_qk
            if has_tail:
                log_qt = torch.logsumexp(log_q.scatter(1, ids, -math.inf), dim=-1, keepdim=True)
                log_qb = torch.cat([log_qk, log_qt], dim=-1)
            kd, h = _divergence_and_dlogq(log_p, log_qb, config, with_grad)
            loss = kd.sum() * (alpha / n)
            if h is not None:
                # Bucket b's probability Q_b = Σ_{j∈b} q_j, so ∂D/∂s_j = (q_j/Q_b)·h_b − q_j·Σh.
                h_sum = h.sum(-1, keepdim=True)
                grad = log_q.exp().mul_(-h_sum)
                if has_tail:  # q_j/Q_tail in log space; an empty (−inf) tail contributes 0
                    live = log_qt > -math.inf
                    share = (log_q - torch.where(live, log_qt, 0.0)).exp_()
                    grad.add_(share.mul_(torch.where(live, h[:, k:], 0.0)))
                grad.scatter_(1, ids, h[:, :k] - log_qk.exp() * h_sum)
                grad.mul_(alpha / n)
        if alpha < 1.0:
            ce, ce_grad = _ce_rows(log_q, targets[b, start:end], (1 - alpha) / n, with_grad)
            loss = loss + ce
            grad = ce_grad if grad is None else grad.add_(ce_grad)
        return loss, grad

    return _ChunkedLoss.apply(logits, rows_fn, chunks, dtype, grad_mode)
