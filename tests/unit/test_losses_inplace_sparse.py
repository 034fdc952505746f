"""The in-place gradient, the sparse top-k variant and the torch-only import of the losses
(helpers: loss_reference.py)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import torch
from loss_reference import (
    KIND_IDS,
    KINDS,
    LOSSES_PY,
    MASK,
    B,
    LiveBytes,
    T,
    V,
    brute_force_loss,
    brute_force_sparse_loss,
    grads_through_lm_head,
    lm_head_and_hidden,
    loss_and_grad,
    make_inputs,
    one_thread,  # noqa: F401  (an autouse fixture: imported to apply here)
    topk_of,
)

from stillhouse.rollout.distill.losses import (
    KDLossConfig,
    _uncovered,
    divergence,
    kd_loss,
    sparse_kd_loss,
)

# ---- in-place gradient (inplace_grad=True) ---------------------------------------------------


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
        sparse_kd_loss(
            student.transpose(0, 1), ids.transpose(0, 1), logprobs.transpose(0, 1), config=cfg
        )


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
        (0, 0, 1),
        (0, 3, 4),
        (1, 0, 5),
        (2, 2, 5),
        (3, 0, 5),
    ]
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
        "import sys, stillhouse.rollout.distill.losses\n"
        "print(*sorted(m for m in sys.modules if m.startswith(('stillhouse', 'transformers'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [
        "stillhouse",
        "stillhouse.rollout",
        "stillhouse.rollout.distill",
        "stillhouse.rollout.distill.losses",
    ]
