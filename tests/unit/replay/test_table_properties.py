"""Invariants of ReplayTable under random insert/sample sequences, and restore equals the live state."""

from __future__ import annotations

import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from replay.config import ReplayConfig
from replay.synthetic import group_batch
from replay.table import ReplayTable

_op = st.one_of(
    st.tuples(st.just("insert"), st.integers(1, 4), st.integers(0, 3)),  # groups, policy_version
    st.tuples(st.just("sample"), st.integers(1, 3), st.integers(0, 6)),  # groups, learner policy_version
)
_cfg = st.builds(
    ReplayConfig,
    sampler=st.sampled_from(["fifo", "lifo", "uniform", "prioritized"]),
    max_times_sampled=st.sampled_from([1, 2, None]),
    capacity_groups=st.integers(2, 6),
    capacity_tokens=st.sampled_from([None, 400]),
    on_full=st.sampled_from(["block", "evict_oldest"]),
    max_staleness=st.sampled_from([None, 0, 2]),
)


def _run(table: ReplayTable, ops: list) -> dict[str, int]:
    """Apply ops; returns how often each group was sampled."""
    sampled: dict[str, int] = {}
    for i, (kind, n, version) in enumerate(ops):
        if kind == "insert":
            table.insert(
                group_batch(
                    [f"g{i}-{j}" for j in range(n)], group_size=2, completion_tokens=8, policy_version=version, seed=i
                )
            )
            continue
        result = table.sample(n, version)
        if result is not None:
            gids = list(dict.fromkeys(result.batch["group_id"].to_pylist()))
            assert len(gids) == n == len(result.group_weights) == len(result.staleness)
            assert all(0 < w <= 1.0 for w in result.group_weights)
            for g in gids:
                sampled[g] = sampled.get(g, 0) + 1
    return sampled


@settings(max_examples=60, deadline=None)
@given(_cfg, st.lists(_op, max_size=25))
def test_counts_capacity_and_remover_invariants(cfg, ops):
    table = ReplayTable(cfg)
    sampled = _run(table, ops)
    s = table.stats()
    assert s.groups == len(table) <= cfg.capacity_groups
    assert cfg.capacity_tokens is None or s.tokens <= cfg.capacity_tokens
    assert s.inserted_groups == s.groups + s.evicted_stale + s.evicted_capacity + s.removed_sampled
    assert s.sampled_groups == sum(sampled.values())
    if cfg.max_times_sampled is not None:
        assert max(sampled.values(), default=0) <= cfg.max_times_sampled
    if cfg.on_full == "block":
        assert s.evicted_capacity == 0
    assert (s.bytes == 0) == (s.groups == 0)


@settings(max_examples=30, deadline=None)
@given(_cfg, st.lists(_op, max_size=20))
def test_restore_reproduces_the_live_table(cfg, ops):
    with tempfile.TemporaryDirectory() as d:
        cfg = cfg.model_copy(update={"segment_dir": d, "sampler": "fifo", "max_staleness": None})
        live = ReplayTable(cfg)
        _run(live, ops)
        restored = ReplayTable(cfg)
        a, b = live.stats(), restored.stats()
        assert (a.groups, a.traces, a.tokens, a.inserted_groups, a.sampled_groups) == (
            b.groups,
            b.traces,
            b.tokens,
            b.inserted_groups,
            b.sampled_groups,
        )
        if a.groups:
            assert live.sample(a.groups, 0).batch.equals(restored.sample(b.groups, 0).batch)
