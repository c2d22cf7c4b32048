"""`learner.lr_schedule.lr_multiplier` by value, and the learner config's checks on it."""

from __future__ import annotations

import math

import pytest

from learner.config import LearnerConfig
from learner.lr_schedule import lr_multiplier


def test_warmup_then_constant():
    assert [lr_multiplier(s, 4, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_and_cosine_reach_the_floor_at_total_steps_and_stay():
    # warm-up 2, decay over steps 2..12 (10 steps), floor 0.1
    assert lr_multiplier(2, 2, "linear", 12, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(7, 2, "linear", 12, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(7, 2, "cosine", 12, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_multiplier(4, 2, "cosine", 12, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    for schedule in ("linear", "cosine"):
        assert lr_multiplier(12, 2, schedule, 12, 0.1) == pytest.approx(0.1)
        assert lr_multiplier(50, 2, schedule, 12, 0.1) == pytest.approx(0.1)


def test_decay_needs_its_end_and_is_refused_with_schedule_free():
    with pytest.raises(ValueError, match="lr_decay_steps"):
        LearnerConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="schedule_free_adamw"):
        LearnerConfig(lr_schedule="linear", lr_decay_steps=10, optimizer="schedule_free_adamw")
    assert LearnerConfig(lr_schedule="cosine", lr_decay_steps=100, min_lr_ratio=0.1).lr_decay_steps == 100
