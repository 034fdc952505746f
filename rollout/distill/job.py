"""The student-training step as a standalone job, for `accelerate launch` on GPU clusters.

`stillhouse redistill` writes every variant's job into its run directory before training
(`job.json`, `train.jsonl`, `heldout.jsonl`, `init/`), then trains in-process. When a student
outgrows one machine, train the same job across GPUs and nodes instead, then let redistill
pick up the finished checkpoint (it resumes after the last finished epoch, so nothing is
trained twice) and evaluate and register as usual:

    stillhouse redistill --prepare-only
    accelerate launch --multi_gpu --num_processes 8 -m stillhouse.rollout.distill.job \\
        .stillhouse/runs/<dataset>-<config>/kd          # add --use_fsdp for FSDP
    stillhouse redistill
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stillhouse.rollout.distill.config import DistillConfig
from stillhouse.rollout.distill.losses import KDLossConfig
from stillhouse.rollout.distill.training import DistillExample, DistillResult, train_student

JOB_FILE = "job.json"


def _write_examples(path: Path, examples: list[DistillExample]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(asdict(e)) + "\n")


def _rows(rows: list[list[Any]] | None) -> tuple[tuple[Any, ...], ...] | None:
    return None if rows is None else tuple(tuple(row) for row in rows)


def _read_examples(path: Path) -> list[DistillExample]:
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out.append(
                DistillExample(
                    tuple(d["input_ids"]),
                    d["answer_start"],
                    _rows(d["top_ids"]),
                    _rows(d["top_logprobs"]),
                )
            )
    return out


def write_job(
    job_dir: Path,
    cfg: DistillConfig,
    train: list[DistillExample],
    heldout: list[DistillExample],
    student: Any,
    *,
    pad_id: int,
    top_k: int,
    teacher_dir: Path,
    lora: dict[str, int] | None,
) -> None:
    """Everything a training process needs, so it can run on another machine."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the caller's progress display says what happens
    job_dir.mkdir(parents=True, exist_ok=True)
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    if not (job_dir / "init" / "config.json").is_file():
        base.save_pretrained(str(job_dir / "init"))
    _write_examples(job_dir / "train.jsonl", train)
    _write_examples(job_dir / "heldout.jsonl", heldout)
    spec = {
        "config": asdict(cfg),
        "pad_id": pad_id,
        "top_k": top_k,
        "teacher_dir": str(teacher_dir),
        "lora": lora,
    }
    (job_dir / JOB_FILE).write_text(json.dumps(spec, indent=2))


def run_job(job_dir: Path) -> DistillResult:
    from transformers import LlamaForCausalLM

    spec = json.loads((job_dir / JOB_FILE).read_text())
    raw = spec["config"]
    cfg = DistillConfig(**{**raw, "kd": KDLossConfig(**raw["kd"])})
    student = LlamaForCausalLM.from_pretrained(str(job_dir / "init"))
    if spec["lora"]:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(**spec["lora"]))
    teacher = None
    if cfg.mode == "white-box":
        teacher = LlamaForCausalLM.from_pretrained(spec["teacher_dir"]).eval()
    return train_student(
        student,
        _read_examples(job_dir / "train.jsonl"),
        _read_examples(job_dir / "heldout.jsonl"),
        cfg,
        spec["pad_id"],
        job_dir,
        teacher=teacher,
        top_k=spec["top_k"],
        on_epoch=lambda s: print(f"epoch {s.epoch}: held-out KL {s.heldout_kl:.4f}", flush=True),
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / JOB_FILE).is_file():
        print(
            "usage: python -m stillhouse.rollout.distill.job JOB_DIR  (a dir with job.json)",
            file=sys.stderr,
        )
        return 2
    result = run_job(Path(argv[0]))
    print(f"trained {len(result.history)} epoch(s), best {result.best_epoch}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
