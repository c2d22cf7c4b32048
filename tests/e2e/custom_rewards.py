"""A user reward function for the e2e and preflight tests: it gives every completion full marks, so an eval
that really uses `reward.function` reports accuracy 1.0 where the task's verifier would not."""

from __future__ import annotations


def always_one(problem, completion: str) -> float:
    return 1.0
