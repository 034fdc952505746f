"""Engine cold start and single-request latency, teacher-sized vs student-sized, and the demo
build time. Measured side by side in one run and reported as ratios (the machine is shared and
noisy; absolute times from different runs do not compare).

    make bench                     # or: .venv/bin/python tests/bench/bench_engines.py

The two models have the demo teacher's shape and a student shape with >= 5x fewer parameters,
randomly initialised (start-up and latency do not depend on the weights' values) and saved with
a demo tokenizer, so the benchmark needs no prior `make demo`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from openai import OpenAI
from rich.console import Console
from rich.table import Table

from stillhouse.common.config import DemoSettings, EngineSettings, Settings
from stillhouse.demo.build import build_demo_world, teacher_shape
from stillhouse.rollout.distill import model as train
from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine

REQUESTS = 20
MAX_TOKENS = 32
STUDENT_SHAPE = train.ModelShape(
    hidden_size=128, intermediate_size=384, num_layers=2, num_heads=2, num_kv_heads=2
)
BENCH_DEMO = DemoSettings(
    n_train=900, n_val=36, n_test=90, vocab_size=2048, teacher_epochs=0.5, judge_share=0.3
)


def _save_model(shape: train.ModelShape, tok, out: Path) -> int:
    model = train.new_model(train.llama_config(shape, tok, 512), seed=0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return train.count_parameters(model)


def _measure_engine(model_dir: Path, name: str, prompt: str, log_dir: Path) -> dict[str, float]:
    engine = VllmEngine(EngineSpec(model_dir, name), EngineSettings(), log_dir)
    started = time.monotonic()
    with engine:
        cold = time.monotonic() - started
        client = OpenAI(base_url=engine.base_url, api_key="unused", timeout=120)
        latencies = []
        for _ in range(REQUESTS):
            t0 = time.monotonic()
            client.completions.create(
                model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                extra_body={"ignore_eos": True},  # same number of tokens for both models
            )  # fmt: skip
            latencies.append(time.monotonic() - t0)
    return {"cold_start_s": cold, "latency_p50_s": statistics.median(latencies)}


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="stillhouse-bench-") as tmp:
        root = Path(tmp)
        settings = Settings(state_dir=root / "state", demo=BENCH_DEMO)
        t0 = time.monotonic()
        world = build_demo_world(settings, console=console)
        build_s = time.monotonic() - t0
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(world.tokenizer_dir))
        shapes = {"teacher": teacher_shape(DemoSettings()), "student": STUDENT_SHAPE}
        params = {role: _save_model(shape, tok, root / role) for role, shape in shapes.items()}
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "triage this support ticket.\nticket: " + "x " * 40}],
            add_generation_prompt=True,
            tokenize=False,
        )
        results = {
            role: _measure_engine(root / role, role, prompt, root / "logs") for role in shapes
        }

    table = Table(title=f"vLLM CPU engines: teacher vs student ({REQUESTS} requests each)")
    for column in ("measure", "teacher", "student", "teacher / student"):
        table.add_column(column, justify="right")
    table.add_row(
        "parameters",
        f"{params['teacher'] / 1e6:.2f}M",
        f"{params['student'] / 1e6:.2f}M",
        f"{params['teacher'] / params['student']:.1f}x",
    )
    for key, label in (("cold_start_s", "cold start (s)"), ("latency_p50_s", "latency p50 (s)")):
        t, s = results["teacher"][key], results["student"][key]
        table.add_row(label, f"{t:.3f}", f"{s:.3f}", f"{t / s:.2f}x")
    console.print(table)
    console.print(
        f"demo build, reduced variant ({BENCH_DEMO.n_train} tickets, {BENCH_DEMO.teacher_epochs} "
        f"epoch of the default teacher shape): {build_s:.1f} s; the full build's time is in "
        f".stillhouse/demo/manifest.json (build_seconds)"
    )


if __name__ == "__main__":
    main()
