"""`RecentDraws`: the groups of the last few journalled draws, kept by a restarted shard for `reclaim`.

Contract: a shard journals a draw's removals before it replies; if it dies in between, the caller got an
error but the groups are gone from the restored table. On restore, the table records every journalled
draw's groups here (rows, oldest policy_version, sampling weight), newest `capacity` draws only, and
`pop(draw_id)` hands one draw back at most once. Pure Python + pyarrow.
"""

from __future__ import annotations

import collections
import dataclasses

import pyarrow as pa


@dataclasses.dataclass(frozen=True)
class Drawn:
    rows: pa.RecordBatch  # every trace of the group
    min_version: int  # the group's oldest policy_version
    weight: float  # its sampling weight in the draw


class RecentDraws:
    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._draws: collections.OrderedDict[str, list[Drawn]] = collections.OrderedDict()

    def add(self, draw_id: str, drawn: Drawn) -> None:
        self._draws.setdefault(draw_id, []).append(drawn)
        self._draws.move_to_end(draw_id)
        while len(self._draws) > self.capacity:
            self._draws.popitem(last=False)

    def pop(self, draw_id: str) -> list[Drawn]:
        """The draw's groups, in the order they were drawn, or [] if unknown or already handed back."""
        return self._draws.pop(draw_id, [])

    def __len__(self) -> int:
        return len(self._draws)
