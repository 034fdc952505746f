"""Teacher targets for distillation, from the teacher's OpenAI-compatible server (vLLM).

- black-box: the teacher's answer text (as token ids of the shared tokenizer);
- grey-box: plus the top-k log-probabilities at every answer position (k up to the server's
  `--max-logprobs`), returned as token ids (`return_tokens_as_token_ids`) so nothing is lost
  to detokenization;
- white-box: the answer text here too; the full teacher logits come from a local transformers
  forward pass during training (`rollout/distill/training.py`), never over the wire.

Requests go to `/v1/completions` with the chat-template-rendered prompt, in batches, a bounded
number in flight, each with a timeout and bounded retries. Each target is cached on disk by a
content hash of (teacher fingerprint, mode, sampling settings, prompt), so a rerun of the same
window does not ask the teacher again. Reasoning traces (`<think>...</think>`) are part of the
answer text and stay in the target: the student learns to reason as the teacher did.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

from stillhouse.common.errors import StillhouseError
from stillhouse.common.prompts import parse_triage_answer
from stillhouse.rollout.distill.data import PromptRecord

TOKEN_ID_PREFIX = "token_id:"
_THINK_RE = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


class TeacherError(StillhouseError):
    """The teacher could not produce targets (unreachable, or failing after retries)."""


@dataclass(frozen=True)
class TargetRequest:
    mode: str  # "black-box" | "grey-box" | "white-box"
    top_k: int
    max_tokens: int
    temperature: float
    teacher_fingerprint: str

    def cache_key(self, prompt_key: str) -> str:
        payload = json.dumps({**asdict(self), "prompt": prompt_key}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class TeacherTarget:
    prompt_key: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    # grey-box only: per answer position, the teacher's top-k token ids and log-probabilities
    top_ids: tuple[tuple[int, ...], ...] | None = None
    top_logprobs: tuple[tuple[float, ...], ...] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TeacherTarget:
        d = json.loads(text)
        tup2 = lambda rows: None if rows is None else tuple(tuple(r) for r in rows)  # noqa: E731
        return cls(
            d["prompt_key"],
            d["text"],
            tuple(d["token_ids"]),
            d["finish_reason"],
            tup2(d["top_ids"]),
            tup2(d["top_logprobs"]),
        )


def _token_id(token: str) -> int:
    if not token.startswith(TOKEN_ID_PREFIX):
        raise TeacherError(
            f"teacher returned token {token!r} without ids; the server must support "
            "'return_tokens_as_token_ids' (vLLM does)"
        )
    return int(token[len(TOKEN_ID_PREFIX) :])


def parse_choice(prompt_key: str, choice: Any, top_k: int) -> TeacherTarget:
    """A completions-API choice as a target. Pure: works on the client's response objects."""
    lp = choice.logprobs
    if lp is None or lp.tokens is None:
        raise TeacherError("teacher returned no logprobs; request them with logprobs >= 1")
    token_ids = tuple(_token_id(t) for t in lp.tokens)
    top_ids = top_lps = None
    if top_k > 0 and lp.top_logprobs is not None:
        ids_rows, lp_rows = [], []
        for position in lp.top_logprobs:
            # vLLM adds the sampled token when it is outside the top-k: keep the k best
            best = sorted((position or {}).items(), key=lambda kv: -kv[1])[:top_k]
            ids_rows.append(tuple(_token_id(t) for t, _ in best))
            lp_rows.append(tuple(float(v) for _, v in best))
        top_ids, top_lps = tuple(ids_rows), tuple(lp_rows)
    return TeacherTarget(
        prompt_key, choice.text, token_ids, choice.finish_reason or "", top_ids, top_lps
    )


class TargetCache:
    """A SQLite key-value store of targets; one writer (the collecting thread)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS targets (key TEXT PRIMARY KEY, value TEXT)")

    def get_many(self, keys: Sequence[str]) -> dict[str, TeacherTarget]:
        found: dict[str, TeacherTarget] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, value FROM targets WHERE key IN ({marks})"
            for key, value in self._db.execute(query, chunk):
                found[key] = TeacherTarget.from_json(value)
        return found

    def put_many(self, items: dict[str, TeacherTarget]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO targets VALUES (?, ?)",
                [(k, t.to_json()) for k, t in items.items()],
            )

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class CollectionStats:
    requested: int
    from_cache: int
    asked: int
    seconds: float


def _ask_batch(
    client: openai.OpenAI, model: str, prompts: list[str], req: TargetRequest, retries: int
) -> list[Any]:
    logprobs = max(1, req.top_k if req.mode == "grey-box" else 1)
    for attempt in range(retries + 1):
        try:
            response = client.completions.create(
                model=model,
                prompt=prompts,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                logprobs=logprobs,
                extra_body={"return_tokens_as_token_ids": True},
            )
            return sorted(response.choices, key=lambda c: c.index)
        except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError) as e:
            if attempt == retries:
                raise TeacherError(f"teacher failed after {retries + 1} attempts: {e}") from e
            time.sleep(min(8.0, 0.5 * 2**attempt))
        except openai.BadRequestError as e:
            raise TeacherError(f"teacher rejected the request: {e.message}") from e
    raise AssertionError("unreachable")


def collect_targets(
    client: openai.OpenAI,
    model: str,
    prompts: Sequence[tuple[PromptRecord, str]],
    req: TargetRequest,
    cache: TargetCache,
    *,
    batch_size: int = 32,
    concurrency: int = 4,
    retries: int = 3,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, TeacherTarget], CollectionStats]:
    """Targets for (record, rendered prompt) pairs, keyed by the record's key; cached ones are
    not asked again. Batches run `concurrency` at a time; progress is reported per batch."""
    started = time.monotonic()
    keys = {r.key: req.cache_key(r.key) for r, _ in prompts}
    cached = cache.get_many(list(keys.values()))
    result = {pk: cached[ck] for pk, ck in keys.items() if ck in cached}
    todo = [(r, p) for r, p in prompts if r.key not in result]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    done = len(result)
    if on_progress:
        on_progress(done, len(prompts))
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [
            pool.submit(_ask_batch, client, model, [p for _, p in b], req, retries) for b in batches
        ]
        for batch, future in zip(batches, futures, strict=True):
            choices = future.result()
            new = {
                r.key: parse_choice(r.key, c, req.top_k if req.mode == "grey-box" else 0)
                for (r, _), c in zip(batch, choices, strict=True)
            }
            cache.put_many({keys[k]: t for k, t in new.items()})
            result.update(new)
            done += len(batch)
            if on_progress:
                on_progress(done, len(prompts))
    stats = CollectionStats(
        len(prompts), len(prompts) - len(todo), len(todo), time.monotonic() - started
    )
    return result, stats


def answer_without_reasoning(text: str) -> str:
    """The final answer of a target whose text may start with a `<think>` reasoning trace."""
    return _THINK_RE.sub("", text, count=1)


@dataclass(frozen=True)
class QualityFilter:
    """Rejection sampling of teacher outputs before training."""

    min_tokens: int = 1
    max_tokens: int | None = None
    drop_truncated: bool = True
    answer_format: str | None = "triage"  # None: any text
    min_judge_score: int | None = None


def rejection_reason(
    target: TeacherTarget, f: QualityFilter, judge_score: int | None = None
) -> str | None:
    """Why `target` must not be trained on, or None to keep it. Pure."""
    n = len(target.token_ids)
    if n < f.min_tokens or not target.text.strip():
        return "too_short"
    if f.max_tokens is not None and n > f.max_tokens:
        return "too_long"
    if f.drop_truncated and target.finish_reason == "length":
        return "truncated"
    if (
        f.answer_format == "triage"
        and parse_triage_answer(answer_without_reasoning(target.text)) is None
    ):
        return "bad_format"
    if f.min_judge_score is not None and (judge_score is None or judge_score < f.min_judge_score):
        return "low_judge_score"
    return None


def filter_targets(
    targets: dict[str, TeacherTarget],
    f: QualityFilter,
    judge_scores: dict[str, int] | None = None,
) -> tuple[dict[str, TeacherTarget], Counter[str]]:
    """The kept targets and a count of why the others were dropped."""
    kept: dict[str, TeacherTarget] = {}
    dropped: Counter[str] = Counter()
    for key, target in targets.items():
        reason = rejection_reason(target, f, (judge_scores or {}).get(key))
        if reason is None:
            kept[key] = target
        else:
            dropped[reason] += 1
    return kept, dropped


def fingerprint_model_dir(path: Path) -> str:
    """Identifies a teacher's weights: config and tokenizer by content, weights by content when
    small and by size + mtime when large (hashing tens of GB on every run would be slower than
    asking the teacher)."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(file.name.encode())
        st = file.stat()
        if st.st_size <= 256 * 2**20:
            h.update(file.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
