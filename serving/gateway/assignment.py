"""Sticky A/B arm assignment for the gateway: which model (champion or challenger) serves a user.

The same user must land in the same arm on every request, on every gateway replica and after a
restart, so the assignment is a pure function of (user key, seed, share) built on SHA-256 — never
on Python's `hash()`, which is salted per process (PYTHONHASHSEED).

    key = user_key(body.get("user"), headers.get("x-stillhouse-user"), request_id)
    arm = assign_arm(key, seed="exp-2024-06", challenger_share=0.05)

Each key gets one fixed bucket in [0, 1) and is a challenger iff its bucket lies below the share.
Ramping the share up (0.05 → 0.25 → 0.5) therefore only ever *adds* users to the challenger arm;
nobody flips back and forth. Changing the seed reshuffles everybody (a fresh experiment).
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

from stillhouse.common.roles import Role

Arm = Literal[Role.CHAMPION, Role.CHALLENGER]

USER_HEADER = "x-stillhouse-user"
"""The request header that identifies the user when the body carries no `user` field."""


def user_key(user_field: str | None, header_user: str | None, request_id: str) -> str:
    """The identity an assignment sticks to: the body's `user` field, else the
    `x-stillhouse-user` header, else the request id (then the request is assigned on its own).

    Empty strings count as missing, so `"user": ""` does not lump every such caller into one
    bucket. An empty request id is a gateway bug and raises `ValueError`.
    """
    if user_field:
        return user_field
    if header_user:
        return header_user
    if not request_id:
        raise ValueError("request_id must be a non-empty string")
    return request_id


def bucket(key: str, seed: str) -> float:
    """A deterministic, uniformly spread value in [0, 1) for `key` under `seed`.

    The first 8 bytes of SHA-256(seed + NUL + key) (UTF-8) as a big-endian integer n, mapped to
    n / 2**64 rounded *down* to double precision. Plain `n / 2**64` rounds to nearest and gives
    exactly 1.0 for n >= 2**64 - 2**10, so the low 11 bits (below a double's 53-bit mantissa) are
    dropped first. The NUL separator keeps (seed="a", key="bc") and (seed="ab", key="c") apart.
    """
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    n = int.from_bytes(digest[:8], "big")
    return (n >> 11) / 2**53


def assign_arm(key: str, seed: str, challenger_share: float) -> Arm:
    """`Role.CHALLENGER` iff `bucket(key, seed) < challenger_share`, else `Role.CHAMPION`.

    Monotone in the share by construction: raising it keeps every current challenger a
    challenger. Share 0 sends nobody to the challenger, share 1 everybody. A share outside
    [0, 1] (or NaN) raises `ValueError` rather than being clamped: it is a config mistake.
    """
    if math.isnan(challenger_share) or not 0.0 <= challenger_share <= 1.0:
        raise ValueError(f"challenger_share must be in [0, 1], got {challenger_share!r}")
    return Role.CHALLENGER if bucket(key, seed) < challenger_share else Role.CHAMPION
