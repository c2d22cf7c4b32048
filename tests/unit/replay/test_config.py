"""ReplayConfig: frozen, no unknown keys, start-up errors that name the field and the fix."""

from __future__ import annotations

import pydantic
import pytest

from replay.config import ReplayConfig


def test_defaults_and_frozen():
    cfg = ReplayConfig()
    assert (cfg.sampler, cfg.max_times_sampled, cfg.on_full, cfg.max_staleness) == ("fifo", 1, "evict_oldest", 4)
    with pytest.raises(pydantic.ValidationError):
        cfg.num_shards = 2


def test_unknown_key_and_bad_choice_are_rejected():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        ReplayConfig(shards=2)
    with pytest.raises(pydantic.ValidationError, match="sampler"):
        ReplayConfig(sampler="random")


def test_rate_limiter_that_would_deadlock_is_rejected():
    with pytest.raises(pydantic.ValidationError, match="error_buffer.*raise error_buffer"):
        ReplayConfig(samples_per_insert=4.0, error_buffer=2.0)
    with pytest.raises(pydantic.ValidationError, match="min_size_to_sample"):
        ReplayConfig(min_size_to_sample=10, capacity_groups=5)
