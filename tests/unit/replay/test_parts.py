"""Per-rank parts of a sample: whole groups, token-balanced (LPT), weights and ids kept with their groups."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from replay.parts import join_parts, merge_metas, split_for_ranks, token_balanced_assignment
from replay.synthetic import group_batch
from replay.table import SampleResult


def test_lpt_assignment_balances_hand_computed_case():
    # tokens 10, 9, 8, 3, 2 over 2 parts: 10->0, 9->1, 8->1 (9<10), 3->0 (10<17), 2->0 (13<17): loads 15 / 17
    assert token_balanced_assignment(np.array([10, 9, 8, 3, 2]), 2).tolist() == [0, 1, 1, 0, 0]


def test_first_part_rotates_ties():
    assert token_balanced_assignment(np.array([5, 5]), 3, first_part=2).tolist() == [2, 0]


def _result(ids, prompt_tokens=4, completion_tokens=8, seed=0):
    batch = pa.concat_batches(
        [
            group_batch(
                [g], group_size=2, prompt_tokens=prompt_tokens + i, completion_tokens=completion_tokens, seed=seed
            )
            for i, g in enumerate(ids)
        ]
    )
    weights = tuple(0.1 * (i + 1) for i in range(len(ids)))
    return SampleResult(batch, weights, tuple(range(len(ids))))


def test_split_keeps_groups_whole_with_their_weights_and_balances_tokens():
    res = _result(["a", "b", "c", "d", "e"])
    meta, parts = split_for_ranks(res, 2, groups_left=7)
    assert meta.num_groups == 5 and meta.groups_left == 7
    seen = []
    for k, part in enumerate(parts):
        gids = part.traces.column("group_id").to_pylist()
        assert tuple(dict.fromkeys(gids)) == meta.group_ids[k]  # contiguous groups, order kept
        assert all(gids.count(g) == 2 for g in set(gids))  # whole groups
        assert part.group_weights == tuple(0.1 * (ord(g) - ord("a") + 1) for g in meta.group_ids[k])
        seen += meta.group_ids[k]
    assert sorted(seen) == ["a", "b", "c", "d", "e"]
    assert sum(meta.traces) == 10 and sum(meta.tokens) == sum(p.traces.num_rows and _tokens(p.traces) for p in parts)
    group_tokens = [_tokens(res.batch.filter(pa.compute.equal(res.batch["group_id"], g))) for g in "abcde"]
    assert abs(meta.tokens[0] - meta.tokens[1]) <= max(group_tokens)  # LPT: within one group's tokens


def _tokens(t) -> int:
    return sum(len(x) for c in ("prompt_ids", "completion_ids") for x in t.column(c).to_pylist())


def test_fewer_groups_than_ranks_leaves_none_and_join_refuses_empty():
    meta, parts = split_for_ranks(_result(["a"]), 2)
    assert parts[1] is None and meta.group_ids[1] == ()
    with pytest.raises(ValueError, match="sample at least as many groups as learner ranks"):
        join_parts([parts[1]])


def test_merge_and_join_across_shards():
    m0, p0 = split_for_ranks(_result(["a", "b"]), 2)
    m1, p1 = split_for_ranks(_result(["c", "d"], seed=1), 2)
    merged = merge_metas([m0, m1])
    assert merged.num_groups == 4 and [len(g) for g in merged.group_ids] == [2, 2]
    joined = join_parts([p0[0], p1[0]])
    assert joined.num_groups == 2 and joined.traces.num_rows == 4
