"""Prompts for a re-distillation run: load, window, deduplicate, cap, split off a held-out set.

A prompt file is JSONL. Each line is one of

    {"messages": [{"role": "user", "content": "..."}], "timestamp": "2026-11-20T10:00:00Z"}
    {"prompt": "..."}                                   # one user turn
    {"text": "...", "category": "...", "priority": "..."}   # a demo-corpus ticket

`timestamp` is optional; records without one are always inside the window. Demo tickets keep
their labels so the run can report task accuracy where ground truth exists.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from stillhouse.common.chat import Message
from stillhouse.common.errors import UsageError
from stillhouse.common.prompts import triage_user_message


@dataclass(frozen=True)
class PromptRecord:
    messages: tuple[tuple[tuple[str, str], ...], ...]  # hashable form of [{"role", "content"}]
    timestamp: datetime | None = None
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def chat(self) -> list[Message]:
        return [dict(m) for m in self.messages]

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def key(self) -> str:
        """Content hash of the conversation: the unit of deduplication and of target caching."""
        return hashlib.sha256(json.dumps(self.chat, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class PromptSelection:
    train: list[PromptRecord]
    heldout: list[PromptRecord]
    dataset_hash: str
    counts: dict[str, int] = field(
        default_factory=dict
    )  # loaded, out_of_window, duplicate, over_cap


def _freeze(messages: Sequence[Message]) -> tuple[tuple[tuple[str, str], ...], ...]:
    return tuple(tuple(sorted(m.items())) for m in messages)


def _parse_time(value: object, where: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{where}: timestamp must be an ISO-8601 string")
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{where}: timestamp {value!r} is not ISO-8601") from None
    if t.tzinfo is None:
        raise UsageError(f"{where}: timestamp {value!r} has no time zone")
    return t


def parse_record(obj: object, where: str) -> PromptRecord:
    """One JSONL object as a prompt; a user mistake raises UsageError naming file and line."""
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object")
    labels: tuple[tuple[str, str], ...] = ()
    if "messages" in obj:
        msgs = obj["messages"]
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in msgs
            )
        )
        if not ok:
            raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    elif isinstance(obj.get("text"), str):
        messages = [{"role": "user", "content": triage_user_message(obj["text"])}]
        labels = tuple(
            (k, str(obj[k])) for k in ("category", "priority", "id") if isinstance(obj.get(k), str)
        )
    else:
        raise UsageError(f"{where}: needs 'messages', 'prompt' or 'text'")
    if messages[-1]["role"] == "assistant":
        raise UsageError(f"{where}: the last message must not be the assistant's")
    return PromptRecord(_freeze(messages), _parse_time(obj.get("timestamp"), where), labels)


def load_prompt_file(path: Path) -> list[PromptRecord]:
    if not path.is_file():
        raise UsageError(f"prompt file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            records.append(parse_record(obj, f"{path}:{n}"))
    if not records:
        raise UsageError(f"prompt file has no records: {path}")
    return records


def dataset_hash(records: Iterable[PromptRecord]) -> str:
    h = hashlib.sha256()
    for key in sorted(r.key for r in records):
        h.update(key.encode())
    return h.hexdigest()[:16]


def select_prompts(
    records: Sequence[PromptRecord],
    *,
    now: datetime,
    window: timedelta | None,
    max_prompts: int,
    heldout_share: float,
    seed: int,
) -> PromptSelection:
    """Window (newest `window` only), deduplicate (first occurrence wins), cap at the
    `max_prompts` newest (seeded choice among equals), then split off `heldout_share`.

    Deterministic for the same inputs, so the dataset hash identifies the run's data."""
    counts = Counter(loaded=len(records))
    inside = []
    for r in records:
        if window is not None and r.timestamp is not None and r.timestamp < now - window:
            counts["out_of_window"] += 1
        else:
            inside.append(r)
    seen: set[str] = set()
    unique = []
    for r in inside:
        if r.key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(r.key)
        unique.append(r)
    rng = random.Random(seed)
    rng.shuffle(unique)
    # newest first when timestamps exist; the shuffle decides among records without one
    floor = datetime.min.replace(tzinfo=now.tzinfo)
    unique.sort(key=lambda r: r.timestamp or floor, reverse=True)
    if len(unique) > max_prompts:
        counts["over_cap"] = len(unique) - max_prompts
        unique = unique[:max_prompts]
    n_heldout = max(1, round(len(unique) * heldout_share)) if len(unique) > 1 else 0
    heldout, train = unique[:n_heldout], unique[n_heldout:]
    if not train:
        raise UsageError("no prompts left for training after windowing and deduplication")
    counts["train"], counts["heldout"] = len(train), len(heldout)
    return PromptSelection(train, heldout, dataset_hash(unique), dict(counts))
