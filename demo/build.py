"""Build the demo world under `<state_dir>/demo/`, cached by a hash of everything that shapes it.

    stillhouse demo build [--force]

Layout: `corpus/{train,val,test}.jsonl`, `tokenizer/`, `teacher/` (a transformers model
directory that vLLM serves as is) and `manifest.json` (the cache key, sizes, timings and the
teacher's accuracy as served by vLLM). The key covers the demo settings and the source of the
modules that decide what gets built, so a change to either rebuilds; anything else reuses.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers.utils import logging as hf_logging

from stillhouse.common import prompts
from stillhouse.common.config import DemoSettings, Settings
from stillhouse.common.errors import DemoBuildError
from stillhouse.common.instance_lock import instance_lock
from stillhouse.common.progress import progress_bar
from stillhouse.demo import corpus, examples, teacher, tokenizer
from stillhouse.demo.corpus import CorpusSpec, Ticket, generate_corpus, write_jsonl
from stillhouse.rollout.distill import batching
from stillhouse.rollout.distill import model as llama_model
from stillhouse.rollout.distill.model import ModelShape, count_parameters, llama_config, new_model

MANIFEST = "manifest.json"
# The modules whose code decides the built artefacts; editing one invalidates the cache.
_SHAPING_MODULES = (corpus, prompts, tokenizer, examples, teacher, batching, llama_model)


@dataclass(frozen=True)
class DemoWorld:
    root: Path
    manifest: dict[str, Any]

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def teacher_dir(self) -> Path:
        return self.root / "teacher"

    def split(self, name: str) -> list[Ticket]:
        return corpus.read_jsonl(self.corpus_dir / f"{name}.jsonl")

    def write_manifest(self) -> None:
        path = self.root / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=True))
        tmp.replace(path)


def corpus_spec(demo: DemoSettings) -> CorpusSpec:
    return CorpusSpec(seed=demo.seed, n_train=demo.n_train, n_val=demo.n_val, n_test=demo.n_test)


def teacher_shape(demo: DemoSettings) -> ModelShape:
    heads = max(1, demo.teacher_hidden_size // 64)
    return ModelShape(
        hidden_size=heads * 64,
        intermediate_size=3 * heads * 64,
        num_layers=demo.teacher_layers,
        num_heads=heads,
        num_kv_heads=heads,
    )


def teacher_sft_config(demo: DemoSettings) -> teacher.SftConfig:
    return teacher.SftConfig(epochs=demo.teacher_epochs, seed=demo.seed)


def cache_key(demo: DemoSettings) -> str:
    h = hashlib.sha256()
    # `enabled` decides whether the CLI uses the world, not what it holds.
    shaping = demo.model_dump(mode="json", exclude={"enabled"})
    h.update(json.dumps(shaping, sort_keys=True).encode())
    for module in _SHAPING_MODULES:
        # The syntax tree, not the bytes: reformatting or editing a comment rebuilds nothing.
        tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:16]


def load_demo_world(root: Path) -> DemoWorld | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return DemoWorld(root, manifest)


def _train_teacher(
    settings: Settings, tok: Any, train_split: list[Ticket], out_dir: Path, console: Console
) -> dict[str, Any]:
    demo = settings.demo
    exs = examples.build_training_examples(
        tok, train_split, demo.judge_share, demo.seed, demo.pairwise_share
    )
    shape = teacher_shape(demo)
    model = new_model(llama_config(shape, tok, demo.max_positions), demo.seed)
    n_params = count_parameters(model)
    n_tokens = sum(len(ids) for ids, _ in exs)
    console.print(
        f"teacher: Llama {n_params / 1e6:.2f}M parameters "
        f"({shape.num_layers} layers x {shape.hidden_size} hidden), "
        f"{len(exs)} examples / {n_tokens / 1e3:.0f}k tokens per epoch"
    )
    started = time.monotonic()
    with progress_bar(console) as progress:
        task = progress.add_task("training teacher", total=None, info="")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, info=f"loss {loss:.3f}")

        losses = teacher.train_sft(model, exs, teacher_sft_config(demo), tok.pad_token_id, on_step)
    seconds = time.monotonic() - started
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    hf_logging.disable_progress_bar()  # our own progress bar already said what happens
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))  # vLLM reads the tokenizer from the model directory
    return {
        "parameters": n_params,
        "shape": asdict(shape),
        "train_examples": len(exs),
        "train_tokens_per_epoch": n_tokens,
        "train_seconds": round(seconds, 1),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
    }


def build_demo_world(
    settings: Settings, *, force: bool = False, console: Console | None = None
) -> DemoWorld:
    """Build the corpus, tokenizer and teacher unless the cached build matches the inputs. One
    process builds at a time; another that needs the world meanwhile waits for that build."""
    console = console or Console(quiet=True)
    root = settings.demo_dir
    key = cache_key(settings.demo)

    def up_to_date() -> DemoWorld | None:
        cached = load_demo_world(root)
        if not force and cached is not None and cached.manifest.get("key") == key:
            console.print(f"demo world is up to date ({root}, key {key})")
            return cached
        return None

    if (cached := up_to_date()) is not None:
        return cached

    def waiting(who: str) -> None:
        console.print(f"waiting for {who}, which is building the demo world")

    lock = root.with_name(root.name + ".lock")
    with instance_lock(lock, DemoBuildError, wait=waiting):
        if not force and (cached := up_to_date()) is not None:
            return cached
        return _build(settings, root, key, console)


def _build(settings: Settings, root: Path, key: str, console: Console) -> DemoWorld:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    staging = root.with_name(root.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    world = DemoWorld(staging, {"key": key, "settings": settings.demo.model_dump(mode="json")})
    try:
        started = time.monotonic()
        splits = generate_corpus(corpus_spec(settings.demo))
        for name, tickets in splits.items():
            write_jsonl(tickets, world.corpus_dir / f"{name}.jsonl")
        world.manifest["corpus"] = {
            name: {"tickets": len(t), "hard": sum(x.hard for x in t)} for name, t in splits.items()
        }
        console.print(
            "corpus: "
            + ", ".join(f"{n} {len(t)} tickets" for n, t in splits.items())
            + f" ({len(corpus.CATEGORIES)} categories, {len(corpus.PRIORITIES)} priorities)"
        )
        texts = [
            prompts.triage_user_message(t.text) + "\n" + examples.reference_answer(t)
            for t in splits["train"]
        ]
        tok = tokenizer.train_tokenizer(texts, settings.demo.vocab_size)
        tokenizer.save_tokenizer(tok, world.tokenizer_dir)
        console.print(f"tokenizer: byte-level BPE, {len(tok)} tokens")
        world.manifest["teacher"] = _train_teacher(
            settings, tok, splits["train"], world.teacher_dir, console
        )
        world.manifest["build_seconds"] = round(time.monotonic() - started, 1)
        world.write_manifest()
    except KeyboardInterrupt:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except (OSError, ValueError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise DemoBuildError(f"demo build failed: {e}") from e
    shutil.rmtree(root, ignore_errors=True)
    staging.replace(root)
    return DemoWorld(root, world.manifest)


def sample_judge_items(tickets: list[Ticket], seed: int) -> list[examples.JudgeItem]:
    rng = random.Random(seed)
    return [examples.make_judge_item(t, rng) for t in tickets]


def sample_pairwise_items(tickets: list[Ticket], seed: int) -> list[examples.PairwiseItem]:
    rng = random.Random(seed)
    return [examples.make_pairwise_item(t, rng) for t in tickets]


def evaluate_teacher(
    world: DemoWorld, base_url: str, served_name: str, console: Console
) -> dict[str, Any]:
    """Score the teacher as served by vLLM at `base_url` on the test split; store it in the
    manifest so later runs print it without asking the server again."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    from stillhouse.demo.evaluate import evaluate_served_model

    tok = AutoTokenizer.from_pretrained(str(world.teacher_dir))
    test = world.split("test")
    seed = int(world.manifest["settings"]["seed"])
    items = sample_judge_items(test, seed=seed)
    pairs = sample_pairwise_items(test, seed=seed + 1)
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=2, timeout=300)
    started = time.monotonic()
    with progress_bar(console) as progress:
        task = progress.add_task("evaluating teacher on vLLM", total=None, info="")
        triage, judge, pairwise = evaluate_served_model(
            client,
            served_name,
            tok,
            test,
            items,
            pairs,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    result = {
        "served_by": "vllm",
        "seconds": round(time.monotonic() - started, 1),
        "triage": asdict(triage),
        "judge": asdict(judge),
        "pairwise": asdict(pairwise),
    }
    world.manifest["teacher_eval"] = result
    world.write_manifest()
    return result


def ensure_teacher_evaluated(world: DemoWorld, settings: Settings, console: Console) -> None:
    """Start the teacher on vLLM just long enough to evaluate it, unless already done."""
    if "teacher_eval" in world.manifest:
        return
    from stillhouse.serving.engines.vllm import EngineSpec, VllmEngine

    engine = VllmEngine(
        EngineSpec(world.teacher_dir, "teacher"), settings.engine, settings.logs_dir
    )
    try:
        with console.status("starting vLLM for the teacher (about a minute on 2 cores)"):
            engine.start()
            engine.wait_ready()
        evaluate_teacher(world, engine.base_url, "teacher", console)
    finally:
        engine.stop()
