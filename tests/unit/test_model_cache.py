"""The model cache's bound: per model, the newest `keep` versions and every one in use stay;
downloads under way and names that are no version are never touched."""

from __future__ import annotations

import pytest

from stillhouse.serving.engines.model_cache import prune, to_prune

CASES = [
    ("nothing_to_do", [1, 2, 3], [], 3, []),
    ("the_oldest_go", [1, 2, 3, 4, 5], [], 2, [1, 2, 3]),
    ("an_old_version_in_use_stays", [1, 2, 3, 4, 5], [1], 2, [2, 3]),
    ("in_use_but_not_cached_is_no_error", [3, 4], [9], 1, [3]),
    ("keep_one", [7], [], 1, []),
    ("duplicates_count_once", [2, 2, 1], [], 1, [1]),
]


@pytest.mark.parametrize(
    ("case", "versions", "in_use", "keep", "pruned"), CASES, ids=[c[0] for c in CASES]
)
def test_to_prune_spares_the_newest_and_those_in_use(case, versions, in_use, keep, pruned):
    assert to_prune(versions, in_use, keep) == pruned


def test_prune_deletes_per_model_and_leaves_partial_downloads_alone(tmp_path):
    for path in ("a/1", "a/2", "a/3", "a/.tmp-4", "a/notes", "b/1", "b/2"):
        (tmp_path / path).mkdir(parents=True)
    (tmp_path / "a" / "1" / "model.safetensors").write_bytes(b"w")
    deleted = prune(tmp_path, keep=1, in_use=[("a", 1)])
    assert sorted(str(p.relative_to(tmp_path)) for p in deleted) == ["a/2", "b/1"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".tmp-4", "1", "3", "notes"]
    assert (tmp_path / "a" / "1" / "model.safetensors").exists()


def test_prune_of_a_missing_cache_deletes_nothing(tmp_path):
    assert prune(tmp_path / "absent", keep=1, in_use=[]) == []
