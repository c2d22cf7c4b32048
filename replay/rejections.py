"""Why replay turned a group away: a closed set of reasons, each rejection also carrying a message for people.

`InsertResult.reasons[i]` is the reason of `InsertResult.rejected[i]` (group_id, message). Metrics label
rejections by `reason.value` (bounded cardinality); nothing classifies the messages by their wording.
"""

from __future__ import annotations

import enum


class RejectReason(enum.StrEnum):
    BAD_SCHEMA = "bad_schema"  # the batch's Arrow schema is not TRACE_SCHEMA
    INVALID_TRACE = "invalid_trace"  # a trace of the group breaks the contract (replay/schema.py)
    DUPLICATE = "duplicate"  # the group_id is held or was inserted recently
    TOO_LARGE = "too_large"  # the group alone exceeds a capacity limit
    RATE_LIMITED = "rate_limited"  # samples_per_insert back-pressure
    FULL = "full"  # capacity reached with on_full=block
    SHARD_DOWN = "shard_down"  # the group's shard did not answer within insert_retry_s (client side)
