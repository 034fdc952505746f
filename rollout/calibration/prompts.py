"""Where calibration's held-out prompts come from: two prompt files, or the traffic log.

    prompts, test_prompts = calibration_prompts(settings)   # both lists of chat messages

With `rollout.calibration.prompts_file` (and `test_prompts_file`) set, the first `holdout_size`
prompts of each file (the JSONL format `rollout.distill.data.load_prompt_file` reads: chat
messages, plain prompts or demo tickets); with neither set, the newest `2 × holdout_size`
distinct chat prompts of the traffic log, split alternately into the two sets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stillhouse.common.chat import Messages
from stillhouse.common.config import Settings
from stillhouse.common.errors import UsageError
from stillhouse.common.traffic import TrafficLogReader
from stillhouse.rollout.distill.data import load_prompt_file


def calibration_prompts(settings: Settings) -> tuple[list[Messages], list[Messages] | None]:
    """Held-out prompts to calibrate on, and a fresh set to check the threshold on (None: a
    prompts file without a test file, so no check)."""
    cal = settings.rollout.calibration
    n = cal.holdout_size
    if cal.prompts_file is not None:
        prompts, test = prompts_from_file(cal.prompts_file, n), cal.test_prompts_file
        return prompts, None if test is None else prompts_from_file(test, n)
    prompts = heldout_prompts_from_traffic(settings, 2 * n)
    return prompts[0::2], prompts[1::2]


def prompts_from_file(path: Path, n: int) -> list[Messages]:
    """The first `n` prompts of a JSONL prompt file, as chat messages, in file order."""
    return [record.chat for record in load_prompt_file(path)[:n]]


def chat_messages(record_prompt: str | None) -> Messages | None:
    """The chat messages of a logged chat prompt (its JSON text), or None when unusable."""
    try:
        messages = json.loads(record_prompt or "")
    except json.JSONDecodeError:
        return None
    ok = isinstance(messages, list) and all(isinstance(m, dict) for m in messages)
    return messages if ok and any(m.get("role") == "user" for m in messages) else None


def heldout_prompts_from_traffic(settings: Settings, n: int) -> list[Messages]:
    """The newest `n` distinct chat prompts of answered requests in the traffic log, newest
    first (fewer if the log has fewer). The window widens from an hour back until it has
    enough or holds the whole log, so a long log is never read whole for a small sample."""
    path = settings.traffic_log_path
    if not path.is_file():
        raise UsageError(
            f"no traffic log at {path}: serve traffic first, or set "
            "rollout.calibration.prompts_file"
        )
    now, span = time.time(), 3600.0
    with TrafficLogReader(path) as log:
        total = log.count()
        while True:
            records = log.records(since=now - span)
            seen: dict[str, Messages] = {}
            for record in reversed(records):
                if record.endpoint != "chat" or record.status != 200 or record.prompt in seen:
                    continue
                messages = chat_messages(record.prompt)
                if messages is not None:
                    seen[record.prompt] = messages  # type: ignore[index]
                    if len(seen) == n:
                        break
            if len(seen) >= n or len(records) >= total:
                break
            span *= 4
    if not seen:
        raise UsageError(
            f"no chat prompts in the traffic log {path} (is gateway.traffic_log.log_prompts on?)"
        )
    return list(seen.values())
