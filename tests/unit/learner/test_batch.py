"""`learner.batch`: Arrow-buffer collate against the per-row `to_pydict` collate it replaced, row selection
and micro-batch planning."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.batch import TrainBatch, collate, plan_micro_batches, split_minibatches
from replay.schema import Trace, traces_to_batch


def reference_collate(batch: pa.RecordBatch | pa.Table, pad_id: int) -> TrainBatch:
    """The previous implementation (to_pydict + a Python loop per row), kept as the semantic reference."""
    cols = batch.to_pydict()
    prompts, completions = cols["prompt_ids"], cols["completion_ids"]
    b = len(prompts)
    p, t = max(map(len, prompts)), max(map(len, completions))
    input_ids = torch.full((b, p + t), pad_id, dtype=torch.long)
    attention = torch.zeros((b, p + t), dtype=torch.long)
    mask = torch.zeros((b, t))
    behaviour = torch.zeros((b, t))
    token_rewards = None
    if any(r is not None for r in cols["token_rewards"]):
        token_rewards = torch.zeros((b, t))
    for i, (pr, co) in enumerate(zip(prompts, completions)):
        input_ids[i, p - len(pr) : p] = torch.tensor(pr)
        input_ids[i, p : p + len(co)] = torch.tensor(co)
        attention[i, p - len(pr) : p + len(co)] = 1
        mask[i, : len(co)] = 1.0
        behaviour[i, : len(co)] = torch.tensor(cols["behaviour_logprobs"][i])
        if token_rewards is not None and cols["token_rewards"][i] is not None:
            token_rewards[i, : len(co)] = torch.tensor(cols["token_rewards"][i])
    index: dict[str, int] = {}
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=(attention.cumsum(dim=1) - 1).clamp(min=0),
        prompt_len=p,
        completion_ids=input_ids[:, p:],
        mask=mask,
        behaviour_logprobs=behaviour,
        rewards=torch.tensor(cols["reward"], dtype=torch.float32),
        group_ids=torch.tensor([index.setdefault(k, len(index)) for k in cols["group_id"]], dtype=torch.long),
        policy_version=torch.tensor(cols["policy_version"], dtype=torch.long),
        token_rewards=token_rewards,
    )


def random_traces(seed: int, groups: int = 3, size: int = 4, token_rewards: str = "mixed") -> list[Trace]:
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = tuple(rng.randrange(3, 500) for _ in range(rng.randint(1, 9)))
        for _ in range(size):
            n = rng.randint(1, 12)
            tr = None
            if token_rewards == "all" or (token_rewards == "mixed" and rng.random() < 0.5):
                tr = tuple(rng.uniform(-1, 1) for _ in range(n))
            out.append(
                Trace(
                    group_id=f"g{seed}-{g}",
                    prompt_ids=prompt,
                    completion_ids=tuple(rng.randrange(3, 500) for _ in range(n)),
                    behaviour_logprobs=tuple(-rng.random() for _ in range(n)),
                    reward=rng.random(),
                    policy_version=rng.randint(0, 5),
                    token_rewards=tr,
                )
            )
    rng.shuffle(out)  # groups interleaved: dense ids follow first appearance
    return out


def assert_same(a: TrainBatch, b: TrainBatch) -> None:
    assert a.prompt_len == b.prompt_len
    for name in ("input_ids", "attention_mask", "position_ids", "completion_ids", "mask", "behaviour_logprobs"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    for name in ("rewards", "group_ids", "policy_version"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.token_rewards is None) == (b.token_rewards is None)
    if a.token_rewards is not None:
        assert torch.equal(a.token_rewards, b.token_rewards)


@pytest.mark.parametrize("token_rewards", ["none", "mixed", "all"])
@pytest.mark.parametrize("seed", range(5))
def test_arrow_collate_equals_the_per_row_collate(seed, token_rewards):
    batch = traces_to_batch(random_traces(seed, token_rewards=token_rewards))
    assert_same(collate(batch, pad_id=0), reference_collate(batch, pad_id=0))
    assert_same(collate(batch, pad_id=7), reference_collate(batch, pad_id=7))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), start=st.integers(0, 5), length=st.integers(1, 8), chunks=st.integers(1, 3))
def test_sliced_and_chunked_tables_collate_like_their_rows(seed, start, length, chunks):
    # replay hands out slices and multi-chunk tables: offsets then index into a larger child buffer
    traces = random_traces(seed, groups=4, size=3)
    batch = traces_to_batch(traces).slice(start, length)
    parts = [batch.slice(i * len(batch) // chunks, len(batch) // chunks + 1) for i in range(chunks)]
    table = pa.Table.from_batches([batch])
    chunked = pa.Table.from_batches([p for p in parts if len(p)]).slice(0, len(batch))
    for data in (batch, table, chunked):
        assert_same(collate(data, 0), reference_collate(data, 0))


def test_empty_batch_is_a_clear_error():
    batch = traces_to_batch(random_traces(0)).slice(0, 0)
    with pytest.raises(ValueError, match="empty batch"):
        collate(batch, 0)


def test_select_trims_padding_and_keeps_per_token_alignment():
    tb = collate(traces_to_batch(random_traces(3, groups=2, size=5)), 0)
    prompt_lens, completion_lens = tb.lengths()
    rows = torch.tensor([4, 0, 7])
    sub = tb.select(rows)
    assert sub.prompt_len == int(prompt_lens[rows].max())
    assert sub.completion_ids.shape[1] == int(completion_lens[rows].max())
    for j, i in enumerate(rows.tolist()):
        real = tb.input_ids[i][tb.attention_mask[i].bool()]
        assert torch.equal(sub.input_ids[j][sub.attention_mask[j].bool()], real)
        t = int(completion_lens[i])
        assert torch.equal(sub.completion_ids[j, :t], tb.completion_ids[i, :t])
        assert torch.equal(sub.behaviour_logprobs[j], tb.behaviour_logprobs[i, : sub.mask.shape[1]])
        assert torch.equal(sub.position_ids[j][sub.attention_mask[j].bool()], torch.arange(len(real)))


def test_plan_respects_the_budget_and_covers_every_row_once():
    g = torch.Generator().manual_seed(0)
    p = torch.randint(1, 40, (37,), generator=g)
    t = torch.randint(1, 100, (37,), generator=g)
    plan = plan_micro_batches(p, t, token_budget=600)
    rows = torch.cat(plan)
    assert sorted(rows.tolist()) == list(range(37))
    for mb in plan:
        cost = len(mb) * (int(p[mb].max()) + int(t[mb].max()))
        assert cost <= 600 or len(mb) == 1
    assert plan_micro_batches(p, t, None)[0].numel() == 37 and len(plan_micro_batches(p, t, None)) == 1


def test_plan_is_padded_to_the_ranks_common_count():
    p, t = torch.tensor([5, 5, 5]), torch.tensor([10, 3, 7])
    plan = plan_micro_batches(p, t, token_budget=None, min_count=2)
    assert len(plan) == 2 and sorted(torch.cat(plan).tolist()) == [0, 1, 2]
    plan = plan_micro_batches(p, t, token_budget=None, min_count=5)
    assert [len(x) for x in plan].count(0) == 2 and sorted(torch.cat(plan).tolist()) == [0, 1, 2]


def test_minibatches_partition_the_rows():
    parts = split_minibatches(10, 3, torch.Generator().manual_seed(1))
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert sorted(len(x) for x in parts) == [3, 3, 4]
