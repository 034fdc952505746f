"""Peak memory and time of the chunked KD loss against the straightforward one, side by side.

    .venv/bin/python tests/bench/bench_kd_loss.py     # CPU, float32, vocab 32k and 128k, 512 tokens
    .venv/bin/python tests/bench/bench_kd_loss.py --device cuda --dtype bfloat16 \\
        --vocab 128000 --seq 2048 --batch 4           # a GPU machine, realistic sizes

Goal (from the issue): the chunked loss needs >= 80 % less peak memory and is no slower.

What runs: forward + backward (training is what matters) of the same loss two ways, from the same
inputs (student logits as a leaf that requires grad, teacher logits, answer mask, target ids):

* straightforward: ``F.log_softmax`` over the full [B, T, V] logits of both models in float32,
  then ``F.kl_div`` (forward KL; other divergences use ``losses.divergence`` on the full
  tensors), masked mean, autograd backward;
* chunked: ``stillhouse.rollout.losses.kd_loss`` with the same ``KDLossConfig``.

Both end with ``student.grad`` holding the [B, T, V] gradient, which therefore counts in both.
By default every token counts (``--answer-frac 1``), so the chunked loss cannot win by
skipping prompt tokens; the two losses and gradients are compared and the deviation printed.

Memory is the peak *above the inputs*, i.e. what the loss itself costs. Each (vocab, variant,
round) runs in a fresh subprocess, so nothing one variant allocated or cached is seen by the other.
On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
``memory_allocated`` once the inputs exist. On CPU torch's allocations are invisible to
tracemalloc, so the kernel's resident-set high-water mark is used: once the inputs exist the
worker resets it (``5`` into ``/proc/self/clear_refs``) and reports ``VmHWM`` minus the ``VmRSS``
of that moment; without clear_refs it falls back to ``ru_maxrss`` minus that RSS (inputs are
created in their final dtype, in place, so creating them leaves no higher transient peak). RSS
counts touched pages, so two precautions keep it close to the live tensors: the worker first runs
its variant once on a 2-token slice (faulting in code pages and one-time initialisation before
the reset), and workers run with glibc's mmap threshold fixed at 4 MiB
(``MALLOC_MMAP_THRESHOLD_``), so every tensor of 4 MiB or more has its own mapping and goes back
to the kernel when freed instead of lingering in the heap (by default glibc raises the threshold
up to 32 MiB as blocks are freed). Smaller blocks, such as CPU-sized chunk temporaries, are
reused from the heap as they would be by default; a lower threshold would add an mmap and page
faults to every small allocation and distort the times. What caching remains can only raise the
figure, for both variants alike.

Time is the median forward + backward wall time (CUDA synchronised) over rounds x reps, each
subprocess after one warm-up; rounds alternate which variant goes first. The machine is shared
and noisy: only the ratios, measured side by side in one run, mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stillhouse.rollout.losses import DIVERGENCES, KDLossConfig, divergence, kd_loss

VARIANTS = ("straightforward", "chunked")
MEMORY_GOAL = 0.80  # at least this much less peak memory
TIME_GOAL = 1.00  # chunked time / straightforward time at most this


def straightforward_kd_loss(student, teacher, mask, targets, config: KDLossConfig):
    """The textbook loss: full-vocabulary float32 log-softmax of both models, then KL."""
    temp, alpha = config.temperature, config.alpha
    log_q = F.log_softmax(student / temp if temp != 1 else student, -1, dtype=torch.float32)
    log_p = F.log_softmax(teacher / temp if temp != 1 else teacher, -1, dtype=torch.float32)
    if config.divergence == "forward_kl":
        kd = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    else:
        kd = divergence(log_p, log_q, config)
    per_token = alpha * temp * temp * kd
    if alpha < 1:
        logits = student.float().flatten(0, -2)
        ce = F.cross_entropy(logits, targets.flatten(), reduction="none")
        per_token = per_token + (1 - alpha) * ce.view_as(kd)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1)


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    """One variant in this (fresh) process: peak extra memory, per-rep times, loss, grad."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student = torch.randn(shape, generator=gen, dtype=dtype, device=device).mul_(2)
    student.requires_grad_()
    teacher = torch.randn(shape, generator=gen, dtype=dtype, device=device).mul_(2)
    prompt = round(args.seq * (1 - args.answer_frac))
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool, device=device)
    mask[:, :prompt] = False
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen, device=device)
    config = KDLossConfig(
        divergence=args.divergence,
        temperature=args.temperature,
        alpha=args.alpha,
        chunk_size=args.chunk_size,
    )
    loss_fn = kd_loss if args.worker == "chunked" else straightforward_kd_loss
    # Fault in code pages and one-time initialisation on a 2-token problem, before measuring.
    tiny = student.detach()[:1, :2].clone().requires_grad_()
    loss_fn(tiny, teacher[:1, :2], mask[:1, :2], targets[:1, :2], config).backward()
    del tiny

    def step() -> float:
        student.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = loss_fn(student, teacher, mask, targets, config)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step.loss = loss.item()
        return time.perf_counter() - started

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = _reset_cpu_peak()
        base = _rss_bytes("VmRSS")
    step()  # warm-up, counted in the peak
    times = [step() for _ in range(args.reps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    elif reset:
        peak = _rss_bytes("VmHWM") - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    probe = student.grad.flatten()[:: max(1, student.numel() // 4096)].float().cpu()
    return {"peak": peak, "times": times, "loss": step.loss, "grad_probe": probe.tolist()}


def run_worker(variant: str, vocab: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant]
    for name in ("device", "dtype", "batch", "seq", "divergence", "temperature", "alpha",
                 "answer_frac", "reps", "threads"):  # fmt: skip
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--vocab", str(vocab)]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    # Every CPU allocation >= 4 MiB gets its own mapping, returned to the kernel when freed, so
    # RSS follows the live [tokens x vocab] tensors instead of glibc's retained heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} at vocab {vocab} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(vocab: int, args: argparse.Namespace) -> dict:
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            results[variant].append(run_worker(variant, vocab, args))
    row = {}
    for variant, runs in results.items():
        row[variant] = {
            "peak": statistics.median(r["peak"] for r in runs),
            "time": statistics.median(t for r in runs for t in r["times"]),
            "loss": runs[0]["loss"],
            "grad_probe": torch.tensor(runs[0]["grad_probe"]),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--divergence", default="forward_kl", choices=DIVERGENCES)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens; default: auto")
    parser.add_argument("--answer-frac", type=float, default=1.0, help="share of tokens counted")
    parser.add_argument("--rounds", type=int, default=3, help="fresh subprocesses per variant")
    parser.add_argument("--reps", type=int, default=2, help="timed steps per subprocess")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.vocab = args.vocab[0]
        print(json.dumps(worker(args)))
        return

    tokens = args.batch * args.seq
    print(
        f"KD loss, forward + backward: {args.divergence}, T={args.temperature}, "
        f"alpha={args.alpha}, {tokens} tokens ({args.batch}x{args.seq}, "
        f"{args.answer_frac:.0%} counted), {args.dtype} on {args.device}, "
        f"chunk={args.chunk_size or 'auto'}; median of {args.rounds} rounds x {args.reps} reps"
    )
    header = (
        f"{'vocab':>7} | {'straightforward MiB':>19} | {'chunked MiB':>11} | {'memory saved':>12} |"
        f" {'straightforward s':>17} | {'chunked s':>9} | {'time ratio':>10} | {'max rel dev':>11}"
        f" | goal"
    )
    print(header)
    print("-" * len(header))
    all_met = True
    for vocab in args.vocab:
        row = measure(vocab, args)
        base, ours = row["straightforward"], row["chunked"]
        saved = 1 - ours["peak"] / base["peak"]
        ratio = ours["time"] / base["time"]
        scale = base["grad_probe"].abs().max().clamp_min(1e-30)
        deviation = max(
            abs(ours["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-30),
            ((ours["grad_probe"] - base["grad_probe"]).abs().max() / scale).item(),
        )
        met = saved >= MEMORY_GOAL and ratio <= TIME_GOAL
        all_met &= met
        print(
            f"{vocab:>7} | {base['peak'] / 2**20:>19.1f} | {ours['peak'] / 2**20:>11.1f} |"
            f" {saved:>12.1%} | {base['time']:>17.3f} | {ours['time']:>9.3f} |"
            f" {ratio:>10.2f} | {deviation:>11.1e} | {'met' if met else 'NOT met'}"
        )
    print(
        f"goal: >= {MEMORY_GOAL:.0%} less peak memory and time ratio <= {TIME_GOAL:.2f} "
        f"(chunked / straightforward): {'met' if all_met else 'NOT met'} on every row"
    )


if __name__ == "__main__":
    main()
