"""Brute-force float64 references and shared helpers for the loss tests (test_losses*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stillhouse.rollout.distill.losses import (
    KDLossConfig,
)

LOSSES_PY = Path(__file__).resolve().parents[2] / "rollout" / "distill" / "losses.py"
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
