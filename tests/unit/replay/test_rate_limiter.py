"""RateLimiter: Reverb's SampleToInsertRatio, hand-computed sequences."""

from __future__ import annotations

from replay.rate_limiter import RateLimiter


def test_min_size_only():
    rl = RateLimiter(min_size_to_sample=2, samples_per_insert=None, error_buffer=1.0)
    assert not rl.can_sample(1, size=1) and rl.can_sample(1, size=2) and not rl.can_sample(3, size=2)
    assert rl.can_insert(10**6) and rl.max_sample(5) == 5 and rl.max_sample(1) == 0


def test_samples_per_insert_two_with_buffer():
    # offset = 2 * 1 = 2; diff = 2 * inserts - samples must stay in [2 - 3, 2 + 3] = [-1, 5]
    rl = RateLimiter(min_size_to_sample=1, samples_per_insert=2.0, error_buffer=3.0)
    assert rl.can_insert(1)  # always admitted before min_size_to_sample inserts
    rl.on_insert(1)  # diff 2
    assert rl.max_sample(size=100) == 3 and rl.can_sample(3, 100) and not rl.can_sample(4, 100)
    assert rl.can_insert(1) and not rl.can_insert(2)  # 4 <= 5 < 6
    assert rl.max_insert() == 1
    rl.on_sample(3)  # diff -1
    assert rl.max_sample(100) == 0
    assert rl.max_insert() == 3  # 2 * 4 - 3 = 5
    assert rl.max_ever_sample() == 6


def test_inserts_blocked_until_samples_catch_up():
    rl = RateLimiter(min_size_to_sample=1, samples_per_insert=1.0, error_buffer=1.0)  # diff in [0, 2]
    rl.on_insert(1)
    rl.on_insert(1)  # diff 2
    assert not rl.can_insert(1)
    rl.on_sample(1)  # diff 1
    assert rl.can_insert(1)
