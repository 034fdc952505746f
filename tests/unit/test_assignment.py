"""Sticky A/B assignment: determinism, seed reshuffling, share edges, monotone ramp-up, realised
share and the user-key precedence."""

import hashlib

import pytest

from stillhouse.serving.gateway.assignment import assign_arm, bucket, user_key

KEYS_2K = [f"user-{i}" for i in range(2000)]
KEYS_20K = [f"user-{i}" for i in range(20000)]


@pytest.mark.parametrize(
    ("user_field", "header_user", "request_id", "expected"),
    [
        ("alice", "bob", "req-1", "alice"),  # body field wins over the header
        ("alice", None, "req-1", "alice"),
        (None, "bob", "req-1", "bob"),  # header when no body field
        ("", "bob", "req-1", "bob"),  # empty body field counts as missing
        (None, None, "req-1", "req-1"),  # request id as the last resort
        ("", "", "req-1", "req-1"),  # empty header counts as missing too
        ("alice", "", "req-1", "alice"),
    ],
)
def test_user_key_precedence_is_field_then_header_then_request_id(
    user_field, header_user, request_id, expected
):
    assert user_key(user_field, header_user, request_id) == expected


def test_user_key_rejects_empty_request_id_when_nothing_else_identifies_the_user():
    with pytest.raises(ValueError, match="request_id"):
        user_key(None, "", "")


def test_bucket_is_the_documented_sha256_prefix_and_in_unit_interval():
    digest = hashlib.sha256(b"seed\0alice").digest()
    expected = int.from_bytes(digest[:8], "big") / 2**64
    assert bucket("alice", "seed") == pytest.approx(expected, abs=2**-52)
    assert all(0.0 <= bucket(k, "seed") < 1.0 for k in KEYS_2K)


def test_bucket_separates_seed_and_key_with_nul():
    assert bucket("bc", "a") != bucket("c", "ab")


def test_assignment_is_deterministic_across_calls():
    first = [assign_arm(k, "exp-1", 0.3) for k in KEYS_2K]
    second = [assign_arm(k, "exp-1", 0.3) for k in KEYS_2K]
    assert first == second
    assert [bucket(k, "exp-1") for k in KEYS_2K[:50]] == [bucket(k, "exp-1") for k in KEYS_2K[:50]]


def test_different_seeds_reshuffle_the_arms():
    a = {k for k in KEYS_2K if assign_arm(k, "exp-1", 0.5) == "challenger"}
    b = {k for k in KEYS_2K if assign_arm(k, "exp-2", 0.5) == "challenger"}
    # Independent halves overlap in about a quarter of the keys, far from all or none.
    overlap = len(a & b) / len(KEYS_2K)
    assert 0.2 < overlap < 0.3


def test_share_zero_assigns_nobody_and_share_one_everybody():
    assert all(assign_arm(k, "exp-1", 0.0) == "champion" for k in KEYS_2K)
    assert all(assign_arm(k, "exp-1", 1.0) == "challenger" for k in KEYS_2K)


def test_raising_the_share_never_moves_a_challenger_back():
    shares = [i / 20 for i in range(21)]
    previous: set[str] = set()
    for share in shares:
        current = {k for k in KEYS_2K if assign_arm(k, "ramp", share) == "challenger"}
        assert previous <= current, f"users left the challenger arm at share {share}"
        previous = current
    assert previous == set(KEYS_2K)


@pytest.mark.parametrize("share", [0.05, 0.25, 0.5])
def test_realised_share_is_within_two_points_of_target(share):
    challengers = sum(assign_arm(k, "exp-1", share) == "challenger" for k in KEYS_20K)
    assert abs(challengers / len(KEYS_20K) - share) <= 0.02


@pytest.mark.parametrize("share", [-0.01, 1.01, float("nan"), float("inf")])
def test_share_outside_unit_interval_raises(share):
    with pytest.raises(ValueError, match="challenger_share"):
        assign_arm("alice", "exp-1", share)
