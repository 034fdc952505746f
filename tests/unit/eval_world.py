"""A synthetic traffic log with known answers, for the evaluation commands' tests.

The challenger's answers are better (the fake judge scores answers marked GOOD higher and
prefers them pairwise), the challenger's users are exactly `SHARE` of all, and the
challenger's divergence shifts upward halfway through its shadow records.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

from stillhouse.common.config import Settings
from stillhouse.common.prompts import triage_user_message
from stillhouse.common.traffic import INSERT_SQL, AbChange, TrafficRecord, create_schema, to_row
from stillhouse.eval.drift_sim import SimStudent, simulate_records
from stillhouse.serving.gateway.assignment import assign_arm

SHARE, SEED, USERS, T0 = 0.3, "test-seed", 600, 1_700_000_000.0
MODELS = {"champion": "models:/s/1", "challenger": "models:/s/2"}


def answer(arm: str, i: int) -> str:
    good = (i % 10 < 8) if arm == "challenger" else (i % 10 < 2)
    return f"category: billing\npriority: high\nreply: {'GOOD' if good else 'ok'} {i}"


def write_traffic(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    create_schema(conn)
    items: list = [AbChange(T0 - 1, SHARE, SEED, 0.0, SEED, "gateway-start")]
    per_arm: dict[str, list[str]] = {"champion": [], "challenger": []}
    for i in range(USERS):
        user = f"user-{i}"
        arm = assign_arm(user, SEED, SHARE)
        fallback = i % 7 == 0
        rid = f"req-{i}"
        per_arm[arm].append(rid)
        items.append(TrafficRecord(
            request_id=rid, ts=T0 + i, endpoint="chat", arm=arm,
            served_by="teacher" if fallback else arm, status=200, latency_s=0.05 + 0.001 * i,
            student_model=MODELS[arm], fallback_reason="low_confidence" if fallback else None,
            confidence=-0.5 if fallback else -0.1 + 0.0001 * (i % 50), prompt_tokens=30,
            completion_tokens=20, user_hash=f"h{i}",
            prompt=json.dumps([{"role": "user", "content": triage_user_message(f"ticket {i}")}]),
            answer=answer("teacher" if fallback else arm, i),
            student_answer=answer(arm, i) if fallback else None,
            student_completion_tokens=8 if fallback else None,
        ))  # fmt: skip
    sim = SimStudent()
    for arm, ids in per_arm.items():
        n = len(ids)
        calm = simulate_records(n, sim, seed=1)
        worse = simulate_records(n, sim.worse(2.0), seed=2)
        for j, rid in enumerate(ids):
            # The challenger gets worse halfway; the champion stays as it was.
            src = worse[j] if arm == "challenger" and j >= n // 2 else calm[j]
            items.append(dataclasses.replace(
                src, request_id=rid, ts=T0 + int(rid.split("-")[1]), student_model=MODELS[arm]
            ))  # fmt: skip
    with conn:
        for item in items:
            conn.execute(INSERT_SQL[type(item)], to_row(item))
    conn.close()


def eval_settings(state: Path, judge_url: str) -> Settings:
    """The configured judge (and teacher, for pairwise references) is the fake at `judge_url`;
    the config's own share (0.1) differs from what the log recorded (0.3) on purpose."""
    return Settings.model_validate({
        "state_dir": str(state),
        "gateway": {"ab": {"challenger_share": 0.1, "seed": SEED},
                    "engines": {"teacher": {"base_url": judge_url}}},
        "evaluation": {"window_hours": None,
                       "judge": {"base_url": judge_url, "sample_per_arm": 80, "concurrency": 4},
                       "drift": {"reference_size": 60, "min_current": 20},
                       "ab": {"min_samples": 20}},
    })  # fmt: skip
