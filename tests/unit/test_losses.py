"""The distillation losses against brute-force float64 references on tiny tensors: values, known
limits, masks, gradients, the sparse top-k variant, chunking, memory and the torch-only import."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stillhouse.rollout.losses import (
    KDLossConfig,
    _uncovered,
    divergence,
    kd_loss,
    sparse_kd_loss,
)

LOSSES_PY = Path(__file__).resolve().parents[2] / "rollout" / "losses.py"
B, T, V = 2, 5, 11
MASK = torch.tensor([[False, True, True, False, True], [False, False, True, True, True]])
# (divergence, extra config) covering every branch, both JSD endpoints and the skew limits.
KINDS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"skew": 0.0}),
    ("skew_kl", {"skew": 0.1}),
]
KIND_IDS = [f"{kind}-{extra}" if extra else kind for kind, extra in KINDS]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads; on a busy machine OpenMP barriers cost ms per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(seed: int = 0, dtype: torch.dtype = torch.float64, vocab: int = V, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, vocab, generator=gen, dtype=dtype) * scale).requires_grad_()
    teacher = torch.randn(B, T, vocab, generator=gen, dtype=dtype) * scale
    targets = torch.randint(0, vocab, (B, T), generator=gen)
    return student, teacher, MASK.clone(), targets


def topk_of(teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What an engine returns: top-k ids and their log-probs at T = 1 over the full vocab."""
    logprobs, ids = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    return ids, logprobs


def loss_and_grad(fn, student: torch.Tensor, *args, **kwargs):
    student.grad = None
    loss = fn(student, *args, **kwargs)
    loss.backward()
    grad, student.grad = student.grad, None
    return loss.detach(), grad


# ---- brute force: explicit textbook formulas, float64, plain autograd ----------------------


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a.log() - b.log())).sum(-1)


def brute_divergence(p: torch.Tensor, q: torch.Tensor, cfg: KDLossConfig) -> torch.Tensor:
    if cfg.divergence == "forward_kl" or (cfg.divergence == "jsd" and cfg.beta == 0):
        return kl(p, q)
    if cfg.divergence == "reverse_kl" or (cfg.divergence == "jsd" and cfg.beta == 1):
        return kl(q, p)
    if cfg.divergence == "jsd":
        m = cfg.beta * p + (1 - cfg.beta) * q
        return cfg.beta * kl(p, m) + (1 - cfg.beta) * kl(q, m)
    return kl(p, cfg.skew * p + (1 - cfg.skew) * q)


def brute_combine(kd, student, mask, targets, cfg: KDLossConfig) -> torch.Tensor:
    ce = -torch.log_softmax(student, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    per_token = cfg.alpha * cfg.temperature**2 * kd + (1 - cfg.alpha) * ce
    return per_token[mask].sum() / max(int(mask.sum()), 1)


def brute_force_loss(student, teacher, mask, targets, cfg: KDLossConfig) -> torch.Tensor:
    p = torch.softmax(teacher / cfg.temperature, -1)
    q = torch.softmax(student / cfg.temperature, -1)
    return brute_combine(brute_divergence(p, q, cfg), student, mask, targets, cfg)


def brute_force_sparse_loss(student, ids, logprobs, mask, targets, cfg) -> torch.Tensor:
    """K+1 buckets as documented: teacher (p_k, max(1 − Σp, ε)) renormalised; student
    (q_k, 1 − Σq_k) with q the full softmax."""
    qk = torch.softmax(student, -1).gather(-1, ids)
    q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    pk = logprobs.exp()
    p = torch.cat([pk, (1 - pk.sum(-1, keepdim=True)).clamp_min(cfg.sparse_tail_floor)], -1)
    p = p / p.sum(-1, keepdim=True)
    return brute_combine(brute_divergence(p, q, cfg), student, mask, targets, cfg)


# ---- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"divergence": "kl"},
        {"beta": -0.1},
        {"beta": 1.1},
        {"skew": 1.5},
        {"alpha": -0.01},
        {"alpha": 2.0},
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"temperature": math.inf},
        {"chunk_size": 0},
        {"chunk_size": 2.5},
        {"chunk_size": True},
        {"sparse_tail_floor": 1.0},
        {"sparse_tail_floor": -1e-3},
        {"inplace_grad": 1},
    ],
)
def test_config_rejects_out_of_range_values(bad):
    with pytest.raises(ValueError):
        KDLossConfig(**bad)


def test_config_accepts_the_closed_range_ends():
    KDLossConfig(beta=0.0, skew=1.0, alpha=0.0, chunk_size=1, sparse_tail_floor=0.0)
    KDLossConfig(beta=1.0, skew=0.0, alpha=1.0, temperature=1e-3)


# ---- values and gradients against the brute force ---------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize(("kind", "extra"), KINDS, ids=KIND_IDS)
def test_chunked_loss_equals_brute_force(kind, extra, temperature, alpha):
    student, teacher, mask, targets = make_inputs()
    cfg = KDLossConfig(kind, temperature=temperature, alpha=alpha, chunk_size=3, **extra)
    got = kd_loss(student, teacher, mask, targets, cfg)
    want = brute_force_loss(student, teacher, mask, targets, cfg)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize(("kind", "extra"), KINDS, ids=KIND_IDS)
def test_chunked_gradients_equal_autograd_through_reference(kind, extra, temperature, alpha):
    student, teacher, mask, targets = make_inputs(seed=1)
    cfg = KDLossConfig(kind, temperature=temperature, alpha=alpha, chunk_size=3, **extra)
    _, got = loss_and_grad(kd_loss, student, teacher, mask, targets, cfg)
    _, want = loss_and_grad(brute_force_loss, student, teacher, mask, targets, cfg)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("kind", "extra"), KINDS, ids=KIND_IDS)
def test_chunked_gradient_matches_finite_differences(kind, extra):
    student, teacher, mask, targets = make_inputs(seed=2)
    cfg = KDLossConfig(kind, temperature=1.7, alpha=0.5, chunk_size=2, **extra)
    _, grad = loss_and_grad(kd_loss, student, teacher, mask, targets, cfg)
    x, step = student.detach().clone(), 1e-6
    numeric = torch.zeros_like(x)
    for i in range(x.numel()):
        for sign in (1, -1):
            x.view(-1)[i] += sign * step
            numeric.view(-1)[i] += sign * kd_loss(x, teacher, mask, targets, cfg) / (2 * step)
            x.view(-1)[i] -= sign * step
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)


def test_gradient_scales_with_the_upstream_gradient():
    student, teacher, mask, _ = make_inputs()
    _, once = loss_and_grad(kd_loss, student, teacher, mask)
    _, thrice = loss_and_grad(lambda *a: 3.0 * kd_loss(*a), student, teacher, mask)
    torch.testing.assert_close(thrice, 3.0 * once)


# ---- known limits -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize(("kind", "extra"), KINDS, ids=KIND_IDS)
def test_identical_distributions_give_zero_loss(kind, extra, temperature):
    student, _, mask, _ = make_inputs()
    cfg = KDLossConfig(kind, temperature=temperature, **extra)
    loss, grad = loss_and_grad(kd_loss, student, student.detach().clone(), mask, None, cfg)
    assert abs(loss.item()) < 1e-12
    assert grad.abs().max().item() < 1e-12
    if temperature == 1.0:
        ids, logprobs = topk_of(student.detach(), k=4)
        sparse, sparse_grad = loss_and_grad(sparse_kd_loss, student, ids, logprobs, mask, None, cfg)
        assert abs(sparse.item()) < 1e-12
        assert sparse_grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("kind", "extra"), KINDS, ids=KIND_IDS)
def test_divergences_are_nonnegative(kind, extra, seed):
    student, teacher, _, _ = make_inputs(seed=seed, scale=6.0)
    per_token = divergence(
        torch.log_softmax(teacher, -1), torch.log_softmax(student.detach(), -1), KDLossConfig(kind)
    )
    assert (per_token >= -1e-12).all()
    assert per_token.shape == (B, T)


def test_jsd_endpoints_are_the_kl_forms_as_in_trl():
    student, teacher, mask, _ = make_inputs()
    forward = kd_loss(student, teacher, mask, config=KDLossConfig("forward_kl"))
    reverse = kd_loss(student, teacher, mask, config=KDLossConfig("reverse_kl"))
    assert kd_loss(student, teacher, mask, config=KDLossConfig("jsd", beta=0.0)) == forward
    assert kd_loss(student, teacher, mask, config=KDLossConfig("jsd", beta=1.0)) == reverse
    assert forward != reverse


def test_jsd_interior_vanishes_at_the_endpoints_with_kl_slopes():
    """Numerically, JSD_β → 0 at both ends: JSD_β/β → KL(p‖q), JSD_β/(1−β) → KL(q‖p)."""
    student, teacher, mask, _ = make_inputs()
    forward = kd_loss(student, teacher, mask, config=KDLossConfig("forward_kl"))
    reverse = kd_loss(student, teacher, mask, config=KDLossConfig("reverse_kl"))
    eps = 1e-6
    near_0 = kd_loss(student, teacher, mask, config=KDLossConfig("jsd", beta=eps))
    near_1 = kd_loss(student, teacher, mask, config=KDLossConfig("jsd", beta=1 - eps))
    torch.testing.assert_close(near_0 / eps, forward, rtol=1e-4, atol=0)
    torch.testing.assert_close(near_1 / eps, reverse, rtol=1e-4, atol=0)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_is_bounded_by_binary_entropy_and_log_2(beta):
    bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
    student, teacher, _, _ = make_inputs(scale=8.0)
    assert kd_loss(student, teacher, config=KDLossConfig("jsd", beta=beta)).item() <= bound
    # Disjoint one-hot-like distributions reach the bound.
    far_student = torch.zeros(4, V, dtype=torch.float64).index_fill_(1, torch.tensor([0]), 60.0)
    far_teacher = torch.zeros(4, V, dtype=torch.float64).index_fill_(1, torch.tensor([1]), 60.0)
    far = kd_loss(far_student, far_teacher, config=KDLossConfig("jsd", beta=beta)).item()
    assert bound - 1e-9 < far <= bound + 1e-12 <= math.log(2) + 1e-12


@pytest.mark.parametrize("skew", [0.1, 0.5, 0.9])
def test_skew_kl_lies_between_zero_at_skew_1_and_forward_kl_at_skew_0(skew):
    student, teacher, mask, _ = make_inputs()
    forward = kd_loss(student, teacher, mask, config=KDLossConfig("forward_kl")).item()
    at_0 = kd_loss(student, teacher, mask, config=KDLossConfig("skew_kl", skew=0.0)).item()
    at_1 = kd_loss(student, teacher, mask, config=KDLossConfig("skew_kl", skew=1.0)).item()
    mid = kd_loss(student, teacher, mask, config=KDLossConfig("skew_kl", skew=skew)).item()
    assert at_0 == pytest.approx(forward, rel=1e-12)
    assert at_1 == 0.0
    assert 0.0 < mid <= (1 - skew) * forward  # convexity of KL in its second argument


def test_high_temperature_forward_kl_times_t_squared_becomes_logit_matching():
    """Hinton et al.: T²·KL(p_T‖q_T) → Σ((z_t − z̄_t) − (z_s − z̄_s))² / (2V) as T → ∞."""
    student, teacher, mask, _ = make_inputs()
    got = kd_loss(student, teacher, mask, config=KDLossConfig(temperature=1e3))
    diff = (teacher - teacher.mean(-1, keepdim=True)) - (student - student.mean(-1, keepdim=True))
    want = (diff.pow(2).sum(-1) / (2 * V))[mask].mean()
    torch.testing.assert_close(got, want, rtol=5e-3, atol=0)


def test_alpha_zero_is_cross_entropy_on_the_teacher_tokens_and_ignores_teacher_logits():
    student, teacher, mask, targets = make_inputs()
    garbage_teacher = torch.full_like(teacher, math.nan)
    got = kd_loss(student, garbage_teacher, mask, targets, KDLossConfig(alpha=0.0))
    want = F.cross_entropy(student[mask], targets[mask])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_alpha_below_one_needs_target_ids():
    student, teacher, mask, _ = make_inputs()
    with pytest.raises(ValueError, match="target_ids"):
        kd_loss(student, teacher, mask, None, KDLossConfig(alpha=0.5))


# ---- masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("kind", "extra"), KINDS, ids=KIND_IDS)
def test_empty_mask_gives_zero_not_nan(kind, extra, alpha):
    student, teacher, _, targets = make_inputs()
    empty = torch.zeros(B, T, dtype=torch.bool)
    cfg = KDLossConfig(kind, alpha=alpha, **extra)
    ids, logprobs = topk_of(teacher, k=3)
    for fn, args in ((kd_loss, (teacher,)), (sparse_kd_loss, (ids, logprobs))):
        loss, grad = loss_and_grad(fn, student, *args, empty, targets, cfg)
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(student))


def test_masked_out_tokens_neither_change_the_loss_nor_receive_gradient():
    student, teacher, mask, targets = make_inputs()
    cfg = KDLossConfig("jsd", alpha=0.5, temperature=2.0)
    loss, grad = loss_and_grad(kd_loss, student, teacher, mask, targets, cfg)
    noisy_student = torch.where(mask[..., None], student.detach(), 1e3).requires_grad_()
    noisy_teacher = torch.where(mask[..., None], teacher, -1e3)
    noisy_targets = torch.where(mask, targets, 0)
    noisy, _ = loss_and_grad(kd_loss, noisy_student, noisy_teacher, mask, noisy_targets, cfg)
    assert noisy == loss
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert grad[mask].abs().sum() > 0


def test_no_mask_counts_every_token():
    student, teacher, _, _ = make_inputs()
    all_true = torch.ones(B, T, dtype=torch.bool)
    assert kd_loss(student, teacher) == kd_loss(student, teacher, all_true)


# ---- chunking, shapes, dtypes, autograd contract ----------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 7, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    student, teacher, mask, targets = make_inputs(dtype=torch.float32)
    ids, logprobs = topk_of(teacher, k=4)
    for fn, args in ((kd_loss, (teacher,)), (sparse_kd_loss, (ids, logprobs))):
        base = KDLossConfig("jsd", alpha=0.5)
        want, want_grad = loss_and_grad(fn, student, *args, mask, targets, base)
        cfg = KDLossConfig("jsd", alpha=0.5, chunk_size=chunk_size)
        got, got_grad = loss_and_grad(fn, student, *args, mask, targets, cfg)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)


def test_flat_token_inputs_give_the_same_result_as_batched_ones():
    student, teacher, mask, targets = make_inputs()
    cfg = KDLossConfig("reverse_kl", alpha=0.5)
    batched = kd_loss(student, teacher, mask, targets, cfg)
    flat = kd_loss(student.reshape(-1, V), teacher.reshape(-1, V), mask.reshape(-1),
                   targets.reshape(-1), cfg)  # fmt: skip
    torch.testing.assert_close(flat, batched, rtol=1e-12, atol=0)


def test_logits_sliced_along_the_sequence_give_the_same_loss_and_gradient():
    """TRL-style ``logits[:, prompt - 1 : -1]`` is non-contiguous; chunks are views of it."""
    student, teacher, mask, targets = make_inputs()
    cfg = KDLossConfig("skew_kl", alpha=0.5, chunk_size=2)
    sliced = kd_loss(student[:, 1:-1], teacher[:, 1:-1], mask[:, 1:-1], targets[:, 1:-1], cfg)
    sliced.backward()
    got_grad, student.grad = student.grad, None
    copy = student[:, 1:-1].contiguous()
    want = brute_force_loss(copy, teacher[:, 1:-1], mask[:, 1:-1], targets[:, 1:-1], cfg)
    want.backward()
    torch.testing.assert_close(sliced, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, student.grad, rtol=1e-9, atol=1e-12)


def test_bfloat16_logits_are_computed_in_float32_and_get_a_bfloat16_gradient():
    student, teacher, mask, targets = make_inputs(dtype=torch.float32)
    student16 = student.detach().bfloat16().requires_grad_()
    teacher16 = teacher.bfloat16()
    cfg = KDLossConfig("forward_kl", alpha=0.5, temperature=2.0)
    loss, grad = loss_and_grad(kd_loss, student16, teacher16, mask, targets, cfg)
    exact_student = student16.detach().double().requires_grad_()
    want, want_grad = loss_and_grad(
        brute_force_loss, exact_student, teacher16.double(), mask, targets, cfg
    )
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-2, atol=1e-4)


def test_under_no_grad_the_loss_is_computed_without_a_gradient():
    student, teacher, mask, _ = make_inputs()
    with torch.no_grad():
        loss = kd_loss(student, teacher, mask)
    assert not loss.requires_grad
    assert loss == kd_loss(student, teacher, mask)


@pytest.mark.parametrize("inplace_grad", [False, True])
def test_backward_twice_raises_instead_of_returning_a_stale_gradient(inplace_grad):
    student, teacher, mask, _ = make_inputs()
    loss = kd_loss(student, teacher, mask, config=KDLossConfig(inplace_grad=inplace_grad))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive (CPU-friendly)."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.skip and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def test_chunked_loss_peak_memory_is_about_one_gradient_buffer():
    """Forward + backward keep ≈ one [N × V] gradient (it becomes .grad, not a copy) plus one
    chunk; the straightforward loss holds several float32 [N × V] tensors."""
    n, vocab = 256, 2048
    student = torch.randn(n, vocab, requires_grad=True)
    teacher = torch.randn(n, vocab)
    one_copy = n * vocab * 4
    with LiveBytes(student, teacher) as chunked:
        kd_loss(student, teacher, config=KDLossConfig("jsd", chunk_size=8)).backward()
    student.grad = None
    with LiveBytes(student, teacher) as straightforward:
        log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
        F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean().backward()
    assert chunked.peak < 1.5 * one_copy
    assert straightforward.peak > 3 * one_copy


# ---- in-place gradient (inplace_grad=True) ---------------------------------------------------

HIDDEN = 6


def lm_head_and_hidden(seed: int = 0, bias: bool = True, dtype=torch.float64, tokens=(B, T)):
    gen = torch.Generator().manual_seed(seed)
    lm_head = torch.nn.Linear(HIDDEN, V, bias=bias, dtype=dtype)
    with torch.no_grad():
        for param in lm_head.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=dtype))
    hidden = torch.randn(*tokens, HIDDEN, generator=gen, dtype=dtype).requires_grad_()
    return lm_head, hidden


def grads_through_lm_head(lm_head, hidden, loss_fn, *args) -> list[torch.Tensor]:
    """Gradients of hidden and the lm_head's parameters when the loss is on lm_head(hidden)."""
    leaves = [hidden, *lm_head.parameters()]
    for leaf in leaves:
        leaf.grad = None
    loss_fn(lm_head(hidden), *args).backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("kind", "extra"), KINDS, ids=KIND_IDS)
def test_inplace_grad_through_a_linear_lm_head_equals_buffer_and_brute_force(kind, extra, alpha):
    """What reaches the lm_head's weight, bias and the hidden states, dense and sparse, with a
    partial mask: writing the gradient into the logits changes nothing there."""
    lm_head, hidden = lm_head_and_hidden(seed=5)
    _, teacher, mask, targets = make_inputs(seed=5)
    ids, logprobs = topk_of(teacher, k=3)
    for fn, args, brute, temperature in (
        (kd_loss, (teacher,), brute_force_loss, 1.5),
        (sparse_kd_loss, (ids, logprobs), brute_force_sparse_loss, 1.0),
    ):
        cfg = KDLossConfig(kind, alpha=alpha, temperature=temperature, chunk_size=2, **extra)
        inplace_cfg = KDLossConfig(**{**cfg.__dict__, "inplace_grad": True})
        want = grads_through_lm_head(lm_head, hidden, brute, *args, mask, targets, cfg)
        buffer = grads_through_lm_head(lm_head, hidden, fn, *args, mask, targets, cfg)
        inplace = grads_through_lm_head(lm_head, hidden, fn, *args, mask, targets, inplace_cfg)
        for got, via_buffer, reference in zip(inplace, buffer, want, strict=True):
            torch.testing.assert_close(got, via_buffer, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_inplace_grad_overwrites_the_logits_with_the_gradient_and_zeroes_masked_rows(dtype):
    student, teacher, mask, targets = make_inputs(dtype=dtype)
    cfg = KDLossConfig("jsd", alpha=0.5, chunk_size=2)
    want_loss, want_grad = loss_and_grad(kd_loss, student, teacher, mask, targets, cfg)
    inplace_cfg = KDLossConfig("jsd", alpha=0.5, chunk_size=2, inplace_grad=True)
    loss = kd_loss(student, teacher, mask, targets, inplace_cfg)
    assert loss == want_loss
    assert torch.equal(student.detach(), want_grad)  # already in forward, before any backward
    assert torch.equal(student.detach()[~mask], torch.zeros_like(student.detach()[~mask]))
    (3.0 * loss).backward()
    # A leaf's .grad *is* its storage: no copy was made, and the values are the scaled gradient.
    assert student.grad.data_ptr() == student.data_ptr()
    torch.testing.assert_close(student.grad, 3.0 * want_grad, rtol=0, atol=0)


def test_inplace_grad_peak_memory_is_the_logits_alone():
    """With logits = lm_head(hidden) made inside the tracker: the buffer path holds the logits
    and the gradient buffer (≈ 2 copies of [N × V]), the in-place path the logits alone."""
    n, vocab = 256, 1024
    lm_head = torch.nn.Linear(8, vocab, bias=False)
    hidden = torch.randn(n, 8, requires_grad=True)
    teacher = torch.randn(n, vocab)
    one_copy = n * vocab * 4
    peaks = {}
    for inplace_grad in (False, True):
        cfg = KDLossConfig("jsd", alpha=1.0, chunk_size=4, inplace_grad=inplace_grad)
        with LiveBytes(hidden, teacher, lm_head.weight) as tracker:
            kd_loss(lm_head(hidden), teacher, config=cfg).backward()
        peaks[inplace_grad] = tracker.peak / one_copy
    assert peaks[True] < 1.25, peaks  # the logits + one 4-token chunk + the lm_head's grads
    assert abs(peaks[False] - peaks[True] - 1.0) < 0.05, peaks  # + the gradient buffer


def test_inplace_grad_under_no_grad_computes_the_loss_and_leaves_the_logits_alone():
    student, teacher, mask, _ = make_inputs()
    before = student.detach().clone()
    with torch.no_grad():
        loss = kd_loss(student, teacher, mask, config=KDLossConfig(inplace_grad=True))
    assert torch.equal(student.detach(), before)
    assert loss == kd_loss(student, teacher, mask)


def test_inplace_grad_rejects_logits_it_cannot_write_into():
    student, teacher, mask, _ = make_inputs()
    cfg = KDLossConfig(inplace_grad=True)
    ids, logprobs = topk_of(teacher, k=3)
    with pytest.raises(ValueError, match="require grad"):
        kd_loss(student.detach(), teacher, mask, config=cfg)
    with pytest.raises(ValueError, match="contiguous"):  # batch 2: a strided slice
        kd_loss(student[:, 1:-1], teacher[:, 1:-1], mask[:, 1:-1], config=cfg)
    with pytest.raises(ValueError, match="shares storage"):
        kd_loss(student, student.detach(), mask, config=cfg)
    with pytest.raises(ValueError, match="shares storage"):
        sparse_kd_loss(student, ids, student.detach()[..., :3], mask, config=cfg)
    with pytest.raises(ValueError, match="contiguous"):
        sparse_kd_loss(student.transpose(0, 1), ids.transpose(0, 1), logprobs.transpose(0, 1),
                       config=cfg)  # fmt: skip


def _exp_logits(x):
    return x.exp()  # exp saves its output: the logits themselves


def _exp_base_viewed(x):
    return x.flatten(0, 1).exp().view_as(x)  # the logits are a view of a saved output


@pytest.mark.parametrize("make_logits", [_exp_logits, _exp_base_viewed])
@pytest.mark.parametrize("sparse", [False, True])
def test_inplace_grad_into_logits_a_backward_saved_raises_instead_of_a_wrong_gradient(
    make_logits, sparse
):
    """torch's version counter (shared by views, bases and detached aliases) catches it."""
    x, teacher, mask, _ = make_inputs()
    ids, logprobs = topk_of(teacher, k=3)
    args = (ids, logprobs) if sparse else (teacher,)
    fn, cfg = (sparse_kd_loss if sparse else kd_loss), KDLossConfig(inplace_grad=True)
    loss = fn(make_logits(x), *args, mask, config=cfg)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    logits = x * 1.0  # mul by a number saves nothing, but the second loss saves the logits
    other = logits.square().sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (fn(logits, *args, mask, config=cfg) + other).backward()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [(B * T,), (B, T)])
def test_linear_backward_saves_nothing_that_shares_the_logits_storage(bias, tokens):
    """The premise of the in-place gradient for logits = lm_head(hidden), on this torch."""
    lm_head, hidden = lm_head_and_hidden(bias=bias, tokens=tokens)
    logits = lm_head(hidden)
    storage, nodes, seen = logits.untyped_storage().data_ptr(), [logits.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            value = getattr(node, name) if name.startswith("_saved_") else None
            if isinstance(value, torch.Tensor):
                assert value.untyped_storage().data_ptr() != storage, (node, name)
        nodes += [next_node for next_node, _ in node.next_functions]
    assert len(seen) >= 2


def test_chunk_gaps_are_the_masked_out_rows_and_overlapping_chunks_are_rejected():
    assert _uncovered([(0, 1, 3), (0, 4, 5), (2, 0, 2)], batch=4, seq=5) == [
        (0, 0, 1), (0, 3, 4), (1, 0, 5), (2, 2, 5), (3, 0, 5)
    ]  # fmt: skip
    assert _uncovered([], batch=2, seq=3) == [(0, 0, 3), (1, 0, 3)]
    assert _uncovered([(0, 0, 3), (1, 0, 3)], batch=2, seq=3) == []
    with pytest.raises(AssertionError, match="overlap"):
        _uncovered([(1, 0, 3), (0, 0, 2), (1, 2, 4)], batch=2, seq=5)


# ---- sparse top-k teacher ---------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize(("kind", "extra"), KINDS, ids=KIND_IDS)
def test_sparse_equals_dense_when_the_topk_cover_the_vocabulary(kind, extra, alpha):
    student, teacher, mask, targets = make_inputs()
    ids, logprobs = topk_of(teacher, k=V)
    cfg = KDLossConfig(kind, alpha=alpha, chunk_size=3, **extra)
    dense, dense_grad = loss_and_grad(kd_loss, student, teacher, mask, targets, cfg)
    sparse, sparse_grad = loss_and_grad(sparse_kd_loss, student, ids, logprobs, mask, targets, cfg)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(("kind", "extra"), KINDS, ids=KIND_IDS)
def test_sparse_loss_and_gradients_equal_the_bucket_brute_force(kind, extra, k):
    student, teacher, mask, targets = make_inputs(seed=3)
    ids, logprobs = topk_of(teacher, k=k)
    cfg = KDLossConfig(kind, alpha=0.5, chunk_size=3, **extra)
    got, got_grad = loss_and_grad(sparse_kd_loss, student, ids, logprobs, mask, targets, cfg)
    want, want_grad = loss_and_grad(
        brute_force_sparse_loss, student, ids, logprobs, mask, targets, cfg
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize(("kind", "extra"), KINDS, ids=KIND_IDS)
def test_sparse_loss_is_a_lower_bound_on_the_dense_loss(kind, extra, k):
    """Data processing: merging the non-top-k outcomes into one bucket cannot raise it."""
    student, teacher, mask, _ = make_inputs(seed=4, scale=3.0)
    ids, logprobs = topk_of(teacher, k=k)
    cfg = KDLossConfig(kind, **extra)
    sparse = sparse_kd_loss(student, ids, logprobs, mask, config=cfg)
    dense = kd_loss(student, teacher, mask, config=cfg)
    assert 0 < sparse < dense


def teacher_with_all_mass_in(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A teacher whose full-vocab distribution lives on k tokens: the tail mass r is 0."""
    student, teacher, _, _ = make_inputs()
    ids = teacher.argsort(-1, descending=True)[..., :k]
    logprobs = torch.log_softmax(teacher.gather(-1, ids), -1)
    return student, ids, logprobs


def test_sparse_forward_kl_without_tail_is_renormalised_kl_plus_student_tail_penalty():
    student, ids, logprobs = teacher_with_all_mass_in(k=4)
    cfg = KDLossConfig(sparse_tail_floor=0.0)
    got = sparse_kd_loss(student, ids, logprobs, MASK, config=cfg)
    log_qk = torch.log_softmax(student, -1).gather(-1, ids)
    renormalised = divergence(logprobs, torch.log_softmax(log_qk, -1), cfg)
    tail_penalty = -torch.logsumexp(log_qk, -1)
    torch.testing.assert_close(got, (renormalised + tail_penalty)[MASK].mean(), rtol=1e-10, atol=0)
    assert (tail_penalty[MASK] > 0).all()


def test_sparse_tail_floor_keeps_reverse_kl_finite_when_topk_hold_all_teacher_mass():
    student, ids, logprobs = teacher_with_all_mass_in(k=4)
    no_floor = KDLossConfig("reverse_kl", sparse_tail_floor=0.0)
    assert sparse_kd_loss(student, ids, logprobs, MASK, config=no_floor).isinf()
    loss, grad = loss_and_grad(
        sparse_kd_loss, student, ids, logprobs, MASK, None, KDLossConfig("reverse_kl")
    )
    assert loss.isfinite() and grad.isfinite().all()


def test_sparse_variant_rejects_temperatures_other_than_one():
    student, teacher, mask, _ = make_inputs()
    ids, logprobs = topk_of(teacher, k=3)
    with pytest.raises(ValueError, match="temperature"):
        sparse_kd_loss(student, ids, logprobs, mask, config=KDLossConfig(temperature=2.0))


# ---- imports ----------------------------------------------------------------------------------


def test_losses_module_source_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    roots = set()
    for node in ast.walk(ast.parse(LOSSES_PY.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would pull in stillhouse modules"
            roots.add(node.module.split(".")[0])
    assert "torch" in roots
    assert roots <= allowed, roots - allowed


def test_importing_the_losses_module_loads_no_other_stillhouse_module_nor_transformers():
    code = (
        "import sys, stillhouse.rollout.losses\n"
        "print(*sorted(m for m in sys.modules if m.startswith(('stillhouse', 'transformers'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["stillhouse", "stillhouse.rollout", "stillhouse.rollout.losses"]
