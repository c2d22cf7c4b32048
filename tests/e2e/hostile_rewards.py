"""Reward functions that misbehave on purpose, for the fault-injection e2e test (importable by actors)."""

from __future__ import annotations

import time


def hangs_or_raises(problem, completion: str) -> float:
    """Exact match, except: answers ending in 7, 8 or 9 hang forever; ending in 1, 2 or 3 raise."""
    if problem.answer[-1] in "789":
        time.sleep(3600)
    if problem.answer[-1] in "123":
        raise RuntimeError("a reward function bug")
    return 1.0 if completion.strip() == problem.answer else 0.0
