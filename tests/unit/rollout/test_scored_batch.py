"""The rollout -> replay batch built from flat columns (`sample_group_batch` + `ScoredBatch.to_arrow`) against
the per-`Trace` path (`sample_groups` -> `drop_uniform_groups` -> origin stamp -> `traces_to_batch` ->
`prompt_once`) on the same engine outputs: same schema, and every column equal (trace ids and creation times
are fresh per build, so they are checked for form instead)."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from replay.schema import TRACE_SCHEMA, TraceError, expand_prompts, prompt_once, traces_to_batch
from rollout.engine import FINISH_LENGTH, FINISH_STOP, Completion
from rollout.sampling import drop_uniform_groups, sample_group_batch, sample_groups
from rollout.scored_batch import ScoredBatch
from rollout.tasks import Problem
from services.rollout_worker import origin_stamps
from tests.unit.rollout.test_sampling import RENDERER, SCORE, ScriptedEngine, cut, done

PROBLEMS = [
    Problem("1+2=", "3", "arithmetic+"),
    Problem("5*5=", "25", "arithmetic*"),
    Problem("4+5=", "9", "arithmetic+"),
    Problem("7+1=", "8", "arithmetic+"),
]
GROUPS = [
    [done("3"), cut("3"), done("33")],  # rewards 1, 1, 0: kept
    [done("25"), done("25"), done("25")],  # uniform (all correct)
    [done("9"), cut("7"), done("")],  # kept
    [cut("1"), done("2"), done("3")],  # uniform (all wrong)
]
FIXED = [c for c in ("a", "b", "c", "d")]
STABLE = [f.name for f in TRACE_SCHEMA if f.name not in ("trace_id", "created_at")]


def _stamped(traces, stamps_by_group):
    """The per-Trace origin stamp the rollout worker used to apply (metadata re-dumped with "origin")."""
    return [
        dataclasses.replace(t, metadata=json.dumps({**json.loads(t.metadata), "origin": stamps_by_group[t.group_id]}))
        for t in traces
    ]


def _both(drop_uniform: bool, step_rewards=None, score_batch=None, version_bump=False, origin=True):
    kw = dict(seed=3, group_ids=FIXED, step_rewards=step_rewards, score_batch=score_batch)
    eng = lambda: ScriptedEngine(GROUPS, bump_during_generate=version_bump)  # noqa: E731
    t0 = time.time()
    sampled = sample_group_batch(eng(), PROBLEMS, RENDERER, SCORE, 3, **kw)
    keep = ~sampled.uniform_groups() if drop_uniform else np.ones(sampled.num_groups, dtype=bool)
    kept_ids = [g for g, k in zip(sampled.group_ids, keep) if k]
    positions = {g: 20 + i for i, g in enumerate(FIXED)}
    stamps = origin_stamps(sampled.group_ids, kept_ids, (1, 24), 5, 2, positions) if origin else None
    new = sampled.to_arrow(stamps, keep)

    traces = sample_groups(eng(), PROBLEMS, RENDERER, SCORE, 3, **kw)
    if drop_uniform:
        traces, dropped = drop_uniform_groups(traces)
        assert dropped == int((~keep).sum())
    if origin:
        traces = _stamped(traces, dict(zip(sampled.group_ids, stamps)))
    old = prompt_once(traces_to_batch(traces))
    return new, old, t0


@pytest.mark.parametrize("drop_uniform", [True, False])
def test_columns_equal_the_per_trace_path(drop_uniform):
    new, old, t0 = _both(drop_uniform)
    assert new.schema.equals(TRACE_SCHEMA) and new.num_rows == old.num_rows == (6 if drop_uniform else 12)
    for name in STABLE:
        assert new[name].equals(old[name]), (name, new[name], old[name])
    ids = new["trace_id"].to_pylist()
    assert len(set(ids)) == len(ids) and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert all(t0 <= t <= time.time() for t in new["created_at"].to_pylist())
    assert new["prompt_ids"].to_pylist()[1] == []  # held once per group
    assert expand_prompts(new)["prompt_ids"].equals(expand_prompts(old)["prompt_ids"])


def test_columns_equal_with_step_rewards_failed_scores_a_version_change_and_no_origin():
    def steps(problem, ids):
        return tuple(0.1 * (i % 2) for i in range(len(ids)))

    def score_batch(items):  # the third group's second completion failed to score: that group is dropped
        return [float(SCORE(p, text)) if i != 7 else None for i, (p, text) in enumerate(items)]

    new, old, _ = _both(True, step_rewards=steps, score_batch=score_batch, version_bump=True, origin=False)
    # c dropped for its failed score, b as uniform; d's rewards are equal but its step rewards differ: kept
    assert new.num_rows == old.num_rows == 6 and set(new["group_id"].to_pylist()) == {"a", "d"}
    for name in STABLE:
        assert new[name].equals(old[name]), name
    assert set(new["policy_version_max"].to_pylist()) == {5} and set(new["policy_version"].to_pylist()) == {4}
    assert new["token_rewards"].null_count == 0


def test_uniform_groups_count_token_rewards():
    sampled = sample_group_batch(ScriptedEngine(GROUPS), PROBLEMS, RENDERER, SCORE, 3, group_ids=FIXED)
    assert sampled.uniform_groups().tolist() == [False, True, False, True]
    calls = []

    def steps(problem, ids):  # row 3 (group b's first completion) gets a step reward the others lack
        calls.append(problem.answer)
        return (0.5 if len(calls) == 4 else 0.0,) + (0.0,) * (len(ids) - 1)

    with_steps = sample_group_batch(
        ScriptedEngine(GROUPS), PROBLEMS, RENDERER, SCORE, 3, group_ids=FIXED, step_rewards=steps
    )
    assert calls[3] == "25" and with_steps.uniform_groups().tolist() == [False, False, False, True]


def test_a_broken_row_raises_the_same_contract_error_even_in_a_dropped_group():
    bad = [list(g) for g in GROUPS]
    bad[1][2] = Completion(bad[1][2].token_ids, (0.5,) * len(bad[1][2].token_ids), FINISH_STOP)  # logprob > 0
    sampled = sample_group_batch(ScriptedEngine(bad), PROBLEMS, RENDERER, SCORE, 3, group_ids=FIXED)
    with pytest.raises(TraceError) as new:
        sampled.to_arrow(keep=~sampled.uniform_groups())  # group b is uniform, and still checked
    with pytest.raises(TraceError) as old:
        sample_groups(ScriptedEngine(bad), PROBLEMS, RENDERER, SCORE, 3, group_ids=FIXED)
    tail = lambda e: str(e.value).split("): ", 1)[1]  # noqa: E731  (the prefix names the random trace id)
    assert tail(new) == tail(old) and "(group b)" in str(new.value) and "<= 0" in tail(new)


def test_an_empty_completion_is_refused():
    eng = ScriptedEngine([[done("3"), Completion((), (), FINISH_LENGTH)]])
    with pytest.raises(RuntimeError, match="empty completion"):
        sample_group_batch(eng, PROBLEMS[:1], RENDERER, SCORE, 2)


def test_no_problems_and_all_groups_failed_give_an_empty_batch():
    assert sample_group_batch(ScriptedEngine([]), [], RENDERER, SCORE, 2).num_traces == 0
    failed = sample_group_batch(
        ScriptedEngine(GROUPS), PROBLEMS, RENDERER, SCORE, 3, score_batch=lambda items: [None] * len(items)
    )
    assert failed.num_groups == 0 and failed.to_arrow().num_rows == 0 and failed.to_arrow().schema.equals(TRACE_SCHEMA)


def test_from_traces_round_trips_the_columns():
    traces = sample_groups(ScriptedEngine(GROUPS), PROBLEMS, RENDERER, SCORE, 3, group_ids=FIXED)
    back = ScoredBatch.from_traces(traces, 3).to_arrow()
    old = prompt_once(traces_to_batch(traces))
    for name in STABLE:
        assert back[name].equals(old[name]), name
    assert ScoredBatch.from_traces(traces, 3).group_rewards().tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]]
