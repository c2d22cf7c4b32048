"""Reverb's SampleToInsertRatio rate limiter, counted in groups.

Contract: sampling needs `size >= min_size_to_sample`. With `samples_per_insert = r` set, the
quantity `diff = inserts * r - samples` must stay within `[offset - error_buffer, offset + error_buffer]`
after every insert and sample, where `offset = r * min_size_to_sample`; inserts are always
admitted until `min_size_to_sample` groups have been inserted. So the learner can neither sample
far ahead of rollout (over-fitting a stale buffer) nor fall far behind it (rollout then waits).
With `samples_per_insert = None` only `min_size_to_sample` applies.
"""

from __future__ import annotations

import math


class RateLimiter:
    def __init__(self, min_size_to_sample: int, samples_per_insert: float | None, error_buffer: float):
        self.min_size_to_sample = min_size_to_sample
        self.samples_per_insert = samples_per_insert
        self.error_buffer = error_buffer
        self.inserts = 0
        self.samples = 0

    def _diff(self, extra_inserts: int = 0, extra_samples: int = 0) -> float:
        r = self.samples_per_insert or 0.0
        return (self.inserts + extra_inserts) * r - (self.samples + extra_samples)

    def _bounds(self) -> tuple[float, float]:
        offset = (self.samples_per_insert or 0.0) * self.min_size_to_sample
        return offset - self.error_buffer, offset + self.error_buffer

    def can_sample(self, n: int, size: int) -> bool:
        if size < self.min_size_to_sample or n > size:
            return False
        return self.samples_per_insert is None or self._diff(extra_samples=n) >= self._bounds()[0]

    def can_insert(self, n: int) -> bool:
        if self.samples_per_insert is None or self.inserts + n <= self.min_size_to_sample:
            return True
        return self._diff(extra_inserts=n) <= self._bounds()[1]

    def max_sample(self, size: int) -> int:
        """Largest n with `can_sample(n, size)` (0 if none)."""
        if size < self.min_size_to_sample:
            return 0
        if self.samples_per_insert is None:
            return size
        return max(0, min(size, math.floor(self._diff() - self._bounds()[0] + 1e-9)))

    def max_insert(self) -> int:
        """Largest n with `can_insert(n)`, capped at 2**31 when unlimited."""
        if self.samples_per_insert is None:
            return 2**31
        room = (self._bounds()[1] + self.samples) / self.samples_per_insert - self.inserts
        return max(max(0, self.min_size_to_sample - self.inserts), math.floor(room + 1e-9))

    def max_ever_sample(self) -> int:
        """Largest single sample that can ever be admitted; a larger request would wait forever."""
        if self.samples_per_insert is None:
            return 2**31
        return math.floor(2 * self.error_buffer + 1e-9)

    def on_insert(self, n: int) -> None:
        self.inserts += n

    def on_sample(self, n: int) -> None:
        self.samples += n
