"""ReplayTable: group atomicity, validation, samplers, remover, capacity, staleness, stats."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from replay.config import ReplayConfig
from replay.schema import TRACE_SCHEMA, Trace, traces_to_batch
from replay.synthetic import group_batch
from replay.table import ReplayTable


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def _sampled_groups(result) -> list[str]:
    gids = result.batch["group_id"].to_pylist()
    return list(dict.fromkeys(gids))


def test_insert_then_sample_returns_whole_groups_with_every_column():
    table = ReplayTable(ReplayConfig())
    batch = group_batch(_ids("g", 3), group_size=4)
    res = table.insert(batch)
    assert (res.accepted_groups, res.accepted_traces, res.rejected) == (3, 12, ())
    out = table.sample(2, policy_version=0)
    assert out.batch.schema.equals(TRACE_SCHEMA)
    assert out.batch.num_rows == 8
    assert _sampled_groups(out) == ["g000", "g001"]
    assert out.group_weights == (1.0, 1.0) and out.staleness == (0, 0)
    original = batch.filter(pa.array([g in ("g000", "g001") for g in batch["group_id"].to_pylist()]))
    assert out.batch.equals(original)


def test_interleaved_group_rows_are_regrouped_in_trace_order():
    batch = group_batch(["b", "a"], group_size=3)
    shuffled = batch.take(pa.array([0, 3, 1, 4, 2, 5]))  # b a b a b a
    table = ReplayTable(ReplayConfig(sampler="fifo"))
    assert table.insert(shuffled).accepted_groups == 2
    out = table.sample(2, 0)
    assert out.batch["trace_id"].to_pylist() == ["b/0", "b/1", "b/2", "a/0", "a/1", "a/2"]


def test_a_bad_trace_rejects_only_its_group_with_a_reason():
    good = group_batch(["ok1", "ok2"], group_size=2)
    bad = traces_to_batch(
        [
            Trace("bad", (1,), (5, 6), (-0.1,), 1.0, 0, trace_id="t-short"),  # logprobs length 1 != 2
            Trace("bad", (1,), (5,), (-0.1,), 1.0, 0, trace_id="t-fine"),
        ]
    )
    table = ReplayTable(ReplayConfig())
    res = table.insert(pa.concat_batches([good, bad]))
    assert res.accepted_groups == 2 and res.accepted_traces == 4
    assert [g for g, _ in res.rejected] == ["bad"]
    assert "t-short" in res.rejected[0][1] and "behaviour_logprobs" in res.rejected[0][1]
    assert table.stats().rejected == 1 and len(table) == 2


def test_group_already_held_or_spread_over_inserts_is_rejected():
    table = ReplayTable(ReplayConfig(max_times_sampled=1))
    table.insert(group_batch(["g"], group_size=2))
    again = table.insert(group_batch(["g", "h"], group_size=2))
    assert again.accepted_groups == 1 and again.rejected[0][0] == "g"
    assert "fresh group_id" in again.rejected[0][1]
    table.sample(2, 0)  # both removed
    late = table.insert(group_batch(["g"], group_size=1))  # rest of an already-consumed group
    assert late.accepted_groups == 0 and late.rejected[0][0] == "g"


def test_wrong_schema_rejects_every_group_and_names_the_field():
    batch = group_batch(["a", "b"], group_size=1)
    cast = batch.set_column(5, pa.field("reward", pa.float64()), batch["reward"].cast(pa.float64()))
    res = ReplayTable(ReplayConfig()).insert(cast)
    assert res.accepted_groups == 0 and sorted(g for g, _ in res.rejected) == ["a", "b"]
    assert "'reward' is double, expected float" in res.rejected[0][1]


def test_sample_returns_none_when_too_few_groups_and_takes_nothing():
    table = ReplayTable(ReplayConfig())
    table.insert(group_batch(_ids("g", 2)))
    assert table.sample(3, 0) is None
    assert len(table) == 2 and table.stats().sampled_groups == 0


def test_fifo_and_lifo_orders():
    fifo, lifo = ReplayTable(ReplayConfig(sampler="fifo")), ReplayTable(ReplayConfig(sampler="lifo"))
    for t in (fifo, lifo):
        t.insert(group_batch(_ids("a", 2)))
        t.insert(group_batch(_ids("b", 2)))
    assert _sampled_groups(fifo.sample(3, 0)) == ["a000", "a001", "b000"]
    assert _sampled_groups(lifo.sample(3, 0)) == ["b001", "b000", "a001"]


def test_max_times_sampled_removes_after_n_samples():
    table = ReplayTable(ReplayConfig(sampler="fifo", max_times_sampled=3))
    table.insert(group_batch(["g"]))
    for _ in range(3):
        assert _sampled_groups(table.sample(1, 0)) == ["g"]
    assert table.sample(1, 0) is None
    s = table.stats()
    assert (s.groups, s.sampled_groups, s.removed_sampled) == (0, 3, 1)


def _counts(table: ReplayTable, draws: int, n_groups: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _ in range(draws):
        for g in _sampled_groups(table.sample(1, 0)):
            counts[g] = counts.get(g, 0) + 1
    return counts


def _chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's chi-square (Wilson-Hilferty normal approximation, no scipy)."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    k = len(observed) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_uniform_sampler_is_uniform_chi_square():
    table = ReplayTable(ReplayConfig(sampler="uniform", max_times_sampled=None, seed=1))
    table.insert(group_batch(_ids("g", 8)))
    counts = _counts(table, 4000, 8)
    observed = np.array([counts[g] for g in _ids("g", 8)], dtype=float)
    assert _chi_square_p(observed, np.full(8, 500.0)) > 0.01
    assert sum(counts.values()) == 4000


def test_prioritized_sampler_follows_priority_to_the_alpha_chi_square():
    cfg = ReplayConfig(sampler="prioritized", max_times_sampled=None, priority_exponent=0.5, seed=2)
    table = ReplayTable(cfg)
    table.insert(group_batch(_ids("g", 4)))
    table.update_priorities(_ids("g", 4), [1.0, 4.0, 9.0, 16.0])  # ^0.5 -> 1:2:3:4
    counts = _counts(table, 5000, 4)
    observed = np.array([counts[g] for g in _ids("g", 4)], dtype=float)
    expected = 5000 * np.array([1, 2, 3, 4]) / 10
    assert _chi_square_p(observed, expected) > 0.01
    # A sampler that ignored priorities would fail: uniform expectation is far off.
    assert _chi_square_p(observed, np.full(4, 1250.0)) < 1e-6


def test_prioritized_importance_weights_hand_computed():
    cfg = ReplayConfig(sampler="prioritized", max_times_sampled=None, priority_exponent=1.0, importance_exponent=1.0)
    table = ReplayTable(cfg)
    table.insert(group_batch(["a", "b"]))
    table.update_priorities(["a", "b"], [1.0, 3.0])  # P = 1/4, 3/4; w = (2P)^-1 / max = (2, 2/3) / 2
    seen = {}
    for _ in range(50):
        out = table.sample(1, 0)
        seen[_sampled_groups(out)[0]] = out.group_weights[0]
    assert seen["a"] == pytest.approx(1.0) and seen["b"] == pytest.approx(1 / 3)


def test_default_priority_is_group_reward_spread():
    cfg = ReplayConfig(sampler="prioritized", max_times_sampled=None, priority_exponent=1.0, seed=3)
    flat = [Trace("flat", (1,), (2,), (-0.5,), 1.0, 0) for _ in range(4)]
    mixed = [Trace("mixed", (1,), (2,), (-0.5,), float(i % 2), 0) for i in range(4)]
    table = ReplayTable(cfg)
    table.insert(traces_to_batch(flat + mixed))
    counts = _counts(table, 300, 2)
    assert counts.get("flat", 0) <= 3  # P(flat) = 1e-3 / (1e-3 + 0.5 + 1e-3) ~ 0.2%


def test_staleness_evicts_groups_older_than_max_staleness_and_counts_them():
    table = ReplayTable(ReplayConfig(max_staleness=2, max_times_sampled=None))
    table.insert(group_batch(["v0", "v1", "v2", "v3"], policy_version=[0, 1, 2, 3]))
    out = table.sample(2, policy_version=3)  # 3 - 0 = 3 > 2: v0 goes
    assert _sampled_groups(out) == ["v1", "v2"] and out.staleness == (2, 1)
    assert table.stats().evicted_stale == 1 and len(table) == 3
    assert table.sample(3, policy_version=5) is None  # v1, v2 stale now; only v3 left
    assert table.stats().evicted_stale == 3 and len(table) == 1


def test_group_staleness_uses_its_oldest_trace():
    traces = [
        Trace("mixed", (1,), (2,), (-0.1,), 0.0, 0, policy_version_max=3),
        Trace("mixed", (1,), (2,), (-0.1,), 0.0, 3),
    ]
    table = ReplayTable(ReplayConfig(max_staleness=0))
    table.insert(traces_to_batch(traces))
    assert table.sample(1, policy_version=3) is None and table.stats().evicted_stale == 1


def test_synchronous_mode_max_staleness_zero():
    table = ReplayTable(ReplayConfig(max_staleness=0))
    table.insert(group_batch(["old", "new"], policy_version=[4, 5]))
    assert _sampled_groups(table.sample(1, policy_version=5)) == ["new"]


def test_downweight_keeps_stale_groups_with_decayed_weight():
    cfg = ReplayConfig(max_staleness=1, stale_policy="downweight", stale_weight_decay=0.5, hard_max_staleness=4)
    table = ReplayTable(cfg)
    table.insert(group_batch(["v0", "v2", "v3"], policy_version=[0, 2, 3]))
    out = table.sample(3, policy_version=4)  # staleness 4, 2, 1 -> excess 3, 1, 0
    assert out.staleness == (4, 2, 1) and out.group_weights == (0.125, 0.5, 1.0)
    assert table.stats().evicted_stale == 0


def test_downweight_still_evicts_past_the_hard_bound():
    cfg = ReplayConfig(max_staleness=1, stale_policy="downweight", stale_weight_decay=0.5)  # hard bound 2 * 1
    table = ReplayTable(cfg)
    table.insert(group_batch(["v0", "v1", "v3"], policy_version=[0, 1, 3]))
    out = table.sample(2, policy_version=3)  # v0 is 3 stale > 2: evicted; v1 (2 stale) is down-weighted
    assert _sampled_groups(out) == ["v1", "v3"] and out.group_weights == (0.5, 1.0)
    assert table.stats().evicted_stale == 1


def test_hard_max_staleness_is_validated():
    with pytest.raises(ValueError, match="only with stale_policy='downweight'"):
        ReplayConfig(max_staleness=1, hard_max_staleness=3)
    with pytest.raises(ValueError, match="hard_max_staleness >= max_staleness"):
        ReplayConfig(max_staleness=3, stale_policy="downweight", hard_max_staleness=2)


def test_evict_oldest_when_full_by_groups_and_tokens():
    table = ReplayTable(ReplayConfig(capacity_groups=3))
    table.insert(group_batch(_ids("a", 3)))
    table.insert(group_batch(_ids("b", 2)))
    assert _sampled_groups(table.sample(3, 0)) == ["a002", "b000", "b001"]
    assert table.stats().evicted_capacity == 2
    one = group_batch(["x"], group_size=2, prompt_tokens=10, completion_tokens=1)  # 2 * (10 + 1) = 22 tokens
    by_tokens = ReplayTable(ReplayConfig(capacity_tokens=30))
    by_tokens.insert(one)
    assert by_tokens.stats().tokens == 22
    by_tokens.insert(group_batch(["y"], group_size=2, prompt_tokens=10, completion_tokens=1))
    assert _sampled_groups(by_tokens.sample(1, 0)) == ["y"] and by_tokens.stats().evicted_capacity == 1


def test_capacity_in_traces():
    table = ReplayTable(ReplayConfig(capacity_traces=10))
    table.insert(group_batch(_ids("a", 2), group_size=4))
    table.insert(group_batch(["b"], group_size=4))  # 12 > 10: a000 goes
    assert table.stats().traces == 8 and table.stats().evicted_capacity == 1


def test_dead_rows_are_compacted_away():
    table = ReplayTable(ReplayConfig(sampler="uniform", seed=4))
    batch = group_batch(_ids("g", 8), group_size=2, completion_tokens=64)
    table.insert(batch)
    full = table.stats().bytes
    table.sample(3, 0)
    assert table.stats().bytes == full  # 5 of 8 live: the chunk is kept as is
    table.sample(1, 0)  # 4 of 8 live: copied into a half-size chunk
    assert 0.4 * full < table.stats().bytes < 0.6 * full
    rest = table.sample(4, 0)
    assert rest.batch.num_rows == 8 and table.stats().bytes == 0
    originals = {r["trace_id"]: r for r in batch.to_pylist()}
    assert all(r == originals[r["trace_id"]] for r in rest.batch.to_pylist())  # the copy kept every value


def test_block_mode_rejects_what_does_not_fit_with_a_clear_reason():
    table = ReplayTable(ReplayConfig(capacity_groups=2, on_full="block"))
    res = table.insert(group_batch(_ids("g", 3)))
    assert res.accepted_groups == 2 and res.rejected[0][0] == "g002"
    assert "replay full (2 groups held + 1 new > replay.capacity_groups=2; on_full=block)" in res.rejected[0][1]
    assert not table.can_accept(1, 4, 10) and table.can_accept_ever(2, 8, 10) and not table.can_accept_ever(3, 8, 10)
    table.sample(1, 0)
    assert table.can_accept(1, 4, 10)


def test_group_larger_than_token_capacity_is_rejected():
    table = ReplayTable(ReplayConfig(capacity_tokens=10))
    res = table.insert(group_batch(["big"], prompt_tokens=16))
    assert res.accepted_groups == 0 and "can never fit" in res.rejected[0][1]
    assert "replay.capacity_tokens=10" in res.rejected[0][1]


def test_stats_track_tokens_traces_and_bytes():
    table = ReplayTable(ReplayConfig())
    batch = group_batch(_ids("g", 4), group_size=2)
    table.insert(batch)
    tokens = sum(len(p) + len(c) for p, c in zip(batch["prompt_ids"].to_pylist(), batch["completion_ids"].to_pylist()))
    s = table.stats()
    assert (s.groups, s.traces, s.tokens, s.inserted_groups) == (4, 8, tokens, 4)
    assert batch.nbytes <= s.bytes <= batch.nbytes + 100  # one compacted copy (+ validity bitmaps)
    table.sample(4, 0)
    s = table.stats()
    assert (s.groups, s.traces, s.tokens, s.bytes, s.sampled_groups, s.sampled_traces) == (0, 0, 0, 0, 4, 8)


def test_rate_limiter_gates_sampling_and_inserts():
    # offset = 1 * 3 = 3, so inserts - samples must stay within [2, 4] once 3 groups were inserted
    cfg = ReplayConfig(min_size_to_sample=3, samples_per_insert=1.0, error_buffer=1.0, max_times_sampled=None)
    table = ReplayTable(cfg)
    table.insert(group_batch(_ids("a", 2)))
    assert table.sample(1, 0) is None  # below min_size_to_sample
    table.insert(group_batch(["a002"]))
    assert table.sample(1, 0) is not None  # 3 - 1 = 2 >= 2
    assert table.sample(1, 0) is None  # 3 - 2 = 1 < 2
    res = table.insert(group_batch(["b0", "b1", "b2"]))  # 4 - 1 = 3, 5 - 1 = 4 fit; 6 - 1 = 5 > 4
    assert res.accepted_groups == 2 and "rate limited" in res.rejected[0][1]
    assert table.sample(2, 0) is not None and table.sample(1, 0) is None  # 5 - 3 = 2


def test_impossible_sample_size_is_a_clear_error():
    table = ReplayTable(ReplayConfig(samples_per_insert=1.0, error_buffer=2.0))
    with pytest.raises(ValueError, match="error_buffer"):
        table.sample(5, 0)
    with pytest.raises(ValueError, match="at least one group"):
        table.sample(0, 0)
