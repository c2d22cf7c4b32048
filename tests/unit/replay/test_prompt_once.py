"""A group's prompt held once (on its first trace): compaction, expansion, validation, replay and the dataset."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from learner.batch import collate
from replay.config import ReplayConfig
from replay.schema import Trace, TraceError, expand_prompts, invalid_rows, prompt_once, validate_trace
from replay.segments import read_dataset
from replay.synthetic import group_batch
from replay.table import ReplayTable


def _batch() -> pa.RecordBatch:
    """Two groups whose traces share their group's prompt, carried by every trace (the full layout)."""
    rows = pa.concat_batches(
        [group_batch(["a"], group_size=3, prompt_tokens=5, seed=1), group_batch(["b"], group_size=2, seed=2)]
    )
    shared = rows["prompt_ids"].take(pa.array([0, 0, 0, 3, 3]))
    return rows.set_column(rows.schema.get_field_index("prompt_ids"), rows.schema.field("prompt_ids"), shared)


def test_prompt_once_keeps_only_each_groups_first_prompt_and_expand_inverts_it():
    full = _batch()
    once = prompt_once(full)
    lengths = [len(p) for p in once["prompt_ids"].to_pylist()]
    assert lengths == [5, 0, 0, 16, 0]
    assert once["prompt_ids"].to_pylist()[0] == full["prompt_ids"].to_pylist()[0]
    assert expand_prompts(once).equals(full) and invalid_rows(once) == {}
    assert once.get_total_buffer_size() < full.get_total_buffer_size()


def test_a_group_without_any_prompt_is_invalid():
    once = prompt_once(_batch())
    no_first = once.slice(1, 2)  # group a's traces without the one that carries the prompt
    problems = invalid_rows(no_first)
    assert set(problems) == {0, 1} and "first trace of each group carries" in problems[0]
    with pytest.raises(TraceError, match="prompt_ids is empty"):
        validate_trace(Trace("g", (), (3,), (-1.0,), 0.0, 0))


def test_collate_expands_the_prompt_exactly_as_if_every_trace_had_it():
    full = _batch()
    a, b = collate(full, 0), collate(prompt_once(full), 0)
    for name in ("input_ids", "attention_mask", "position_ids", "completion_ids", "mask", "behaviour_logprobs"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.prompt_len == b.prompt_len


def test_replay_stores_and_returns_the_compact_layout_and_the_dataset_expands_it(tmp_path):
    full = _batch()
    table = ReplayTable(ReplayConfig(segment_dir=str(tmp_path), max_staleness=None))
    assert table.insert(prompt_once(full)).accepted_groups == 2
    out = table.sample(2, 0)
    assert expand_prompts(out.batch).equals(full)
    table.close()
    assert read_dataset(str(tmp_path)).to_batches()[0].equals(full)
    again = ReplayTable(ReplayConfig(segment_dir=str(tmp_path), max_staleness=None, max_times_sampled=None))
    assert len(again) == 0  # both groups were sampled once (max_times_sampled=1) before the restart


def test_restore_keeps_the_compact_layout_trainable(tmp_path):
    cfg = ReplayConfig(segment_dir=str(tmp_path), max_staleness=None)
    table = ReplayTable(cfg)
    table.insert(prompt_once(_batch()))
    table.close()
    restored = ReplayTable(cfg)
    out = restored.sample(2, 0)
    assert torch.equal(collate(out.batch, 0).input_ids, collate(_batch(), 0).input_ids)
