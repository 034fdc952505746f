"""LLM-judge throughput against concurrency on a vLLM CPU judge, one engine, one run (the
machine is shared and noisy: only ratios from the same run compare).

    make bench BENCH=judge          # or: .venv/bin/python tests/bench/bench_judge.py
    .venv/bin/python tests/bench/bench_judge.py --world test --per-level 32

The judge is the demo teacher (`.stillhouse/demo`, made by `make demo`) when it is there, else
the tiny test world's teacher (`.stillhouse/test/demo`, built here in a minute or two if
missing); `--world` picks one. It grades single answers in the demo judge format with
structured output on, through `stillhouse.eval.judge` (the openai client), cache off.

Each concurrency level (1, 2, 4, 8, 16) grades the same `--per-level` (ticket, candidate)
pairs: `c` workers each await one judgment at a time, so a judgment's latency is its own call,
not time queued behind others. vLLM's prefix cache is off, so a later level does not find an
earlier level's prompts cached. Judgments of other tickets warm the engine up first, batched and
alone (not counted).
Reading the table: judgments/s should rise with concurrency until the two cores are busy
(vLLM batches concurrent requests), while p50 latency rises with the batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stillhouse.common.config import EngineSettings, Settings
from stillhouse.demo.build import DemoWorld, load_demo_world, sample_judge_items
from stillhouse.eval.judge import Judge, JudgeConfig, JudgeStats, judge_engine_args
from stillhouse.eval.judge_templates import DemoJudgeTemplate
from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine

REPO = Path(__file__).resolve().parents[2]
LEVELS = (1, 2, 4, 8, 16)
WARMUP = 16
SERVED = "judge"


def find_world(choice: str, console: Console) -> tuple[str, DemoWorld]:
    """The demo world if asked for or present (auto), else the tiny test world (built if
    needed, with the test suite's settings)."""
    if choice in ("auto", "demo"):
        world = load_demo_world(REPO / ".stillhouse" / "demo")
        if world is not None and (world.teacher_dir / "config.json").is_file():
            return "demo", world
        if choice == "demo":
            sys.exit("no demo world at .stillhouse/demo: run `make demo`, or pass --world test")
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TEST_ENGINE, TINY_DEMO  # the tests' own tiny-world settings

    from stillhouse.demo.build import build_demo_world

    settings = Settings(state_dir=REPO / ".stillhouse" / "test", demo=TINY_DEMO, engine=TEST_ENGINE)
    with console.status("tiny test world (built on first use: a minute or two)"):
        return "test", build_demo_world(settings)


async def measure(
    judge: Judge, items: list[tuple[str, str]], workers: int
) -> tuple[float, list[float], JudgeStats]:
    """Wall time, per-judgment latencies, and the judge's counters after the level."""
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    latencies: list[float] = []

    async def worker() -> None:
        while not queue.empty():
            question, answer = queue.get_nowait()
            t0 = time.perf_counter()
            await judge.grade(question, answer)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - started, latencies, judge.stats


async def run_levels(
    base_url: str, items: list[tuple[str, str]], warmup: list[tuple[str, str]]
) -> list[tuple[int, float, float, int, int]]:
    """(concurrency, judgments/s, p50 latency, unparseable, errors) per level."""
    template = DemoJudgeTemplate()
    for level in (max(LEVELS), 1):  # every batch size once, then the single-request path
        config = JudgeConfig(base_url=base_url, model=SERVED, concurrency=level)
        async with Judge(config, template) as judge:
            await judge.grade_many(warmup[: max(level, 4)])
    rows = []
    for level in LEVELS:
        config = JudgeConfig(base_url=base_url, model=SERVED, concurrency=level, timeout_s=300)
        async with Judge(config, template) as judge:
            wall, latencies, stats = await measure(judge, items, level)
        rows.append(
            (level, len(items) / wall, statistics.median(latencies), stats.unparseable,
             stats.errors)
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=("auto", "demo", "test"), default="auto")
    parser.add_argument("--per-level", type=int, default=48, help="judgments per level")
    args = parser.parse_args(argv)
    console = Console()
    which, world = find_world(args.world, console)
    tickets = world.split("test")
    seed = int(world.manifest["settings"]["seed"])
    judged = sample_judge_items(tickets, seed)
    pairs = [(i.ticket.text, i.candidate) for i in judged]
    items, warmup = pairs[: args.per_level], pairs[-WARMUP:]

    template = DemoJudgeTemplate()
    extra = (*judge_engine_args(template), "--no-enable-prefix-caching")
    engine = VllmEngine(
        EngineSpec(world.teacher_dir, SERVED, extra_args=extra),
        EngineSettings(),  # serving defaults (torch.compile on): throughput, not start-up
        REPO / ".stillhouse" / "bench" / "logs",
    )
    started = time.monotonic()
    try:
        with console.status(f"starting vLLM for the {which} teacher (about a minute)"):
            engine.start()
            engine.wait_ready()
        console.print(f"engine ready in {time.monotonic() - started:.0f} s")
        rows = asyncio.run(run_levels(engine.base_url, items, warmup))
    finally:
        engine.stop()

    params = world.manifest.get("teacher", {}).get("parameters", 0)
    table = Table(
        title=f"LLM judge on vLLM CPU: {which} teacher ({params / 1e6:.2f}M parameters), "
        f"{len(items)} single-answer judgments per level, structured output, cache off"
    )
    for column in ("concurrency", "judgments/s", "vs 1", "p50 (s)", "unparseable", "errors"):
        table.add_column(column, justify="right")
    base = rows[0][1]
    for level, rate, p50, unparseable, errors in rows:
        table.add_row(
            str(level), f"{rate:.2f}", f"{rate / base:.2f}x", f"{p50:.3f}", str(unparseable),
            str(errors),
        )  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    main()
