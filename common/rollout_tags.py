"""The version tag a rollout's outcome is recorded in (rollout/promotion.py writes it), and the
rule every gateway reads from it: a challenger rolled back is not served again."""

from __future__ import annotations

from collections.abc import Mapping

OUTCOME_TAG = "stillhouse.rollout.outcome"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"


def rolled_back(tags: Mapping[str, str] | None) -> bool:
    """Whether the version these tags belong to was rolled back during its rollout."""
    return tags is not None and tags.get(OUTCOME_TAG) == ROLLED_BACK
