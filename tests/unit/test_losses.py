"""The distillation losses against brute-force float64 references on tiny tensors: config,
values and gradients, known limits, masks, chunking and memory (helpers: loss_reference.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_reference import (
    KIND_IDS,
    KINDS,
    B,
    LiveBytes,
    T,
    V,
    brute_force_loss,
    loss_and_grad,
    make_inputs,
    one_thread,  # noqa: F401  (an autouse fixture: imported to apply here)
    topk_of,
)

from stillhouse.rollout.distill.losses import (
    KDLossConfig,
    divergence,
    kd_loss,
    sparse_kd_loss,
)

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
    flat = kd_loss(
        student.reshape(-1, V), teacher.reshape(-1, V), mask.reshape(-1), targets.reshape(-1), cfg
    )
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
