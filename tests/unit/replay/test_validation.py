"""Trace validation (replay.schema: one vectorised implementation) against an independent per-trace reference."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.schema import (
    Trace,
    TraceError,
    batch_to_traces,
    invalid_rows,
    schema_problem,
    traces_to_batch,
    validate_trace,
    validate_traces,
)

_logprob = st.sampled_from([-2.0, -0.5, 0.0, 5e-5, 0.3, math.nan, -math.inf])
_reward = st.sampled_from([0.0, 1.0, -3.5, math.nan, math.inf])


@st.composite
def _trace(draw) -> Trace:
    n = draw(st.integers(0, 3))
    n_lp = draw(st.sampled_from([n, n, n, max(0, n - 1), n + 1]))
    token_rewards = draw(st.sampled_from([None, None, n, n + 1]))
    pv = draw(st.integers(-1, 3))
    return Trace(
        group_id=draw(st.sampled_from("abc")),
        prompt_ids=(1, 2),
        completion_ids=tuple(range(n)),
        behaviour_logprobs=tuple(draw(st.lists(_logprob, min_size=n_lp, max_size=n_lp))),
        reward=draw(_reward),
        policy_version=pv,
        policy_version_max=pv + draw(st.integers(-1, 2)),
        token_rewards=None if token_rewards is None else (0.0,) * token_rewards,
    )


def _breaks(t: Trace) -> bool:
    """The contract written out per trace in plain Python (the reference the vectorised checks must match)."""
    n = len(t.completion_ids)
    return (
        n == 0
        or len(t.behaviour_logprobs) != n
        or (t.token_rewards is not None and len(t.token_rewards) != n)
        or not math.isfinite(t.reward)
        or any(not math.isfinite(x) or x > 1e-4 for x in t.behaviour_logprobs)
        or t.policy_version < 0
        or t.policy_version_max < t.policy_version
    )


def _raises(t: Trace) -> bool:
    try:
        validate_trace(t)
    except TraceError:
        return True
    return False


@settings(max_examples=200, deadline=None)
@given(st.lists(_trace(), min_size=1, max_size=8))
def test_invalid_rows_match_validate_trace(traces):
    batch = traces_to_batch(traces)
    expected = {i for i, t in enumerate(batch_to_traces(batch)) if _breaks(t)}
    assert set(invalid_rows(batch)) == expected
    assert {i for i, t in enumerate(traces) if _raises(t)} == expected
    try:  # the batch check names the first broken trace, as checking one by one would
        validate_traces(traces)
        assert not expected
    except TraceError as e:
        assert expected and str(e) == invalid_rows(batch)[min(expected)]
    for got, want in zip(batch_to_traces(batch), traces):  # the flat-buffer packing keeps every row's lists
        assert (got.completion_ids, got.prompt_ids) == (tuple(want.completion_ids), tuple(want.prompt_ids))
        lp = np.array(want.behaviour_logprobs, dtype=np.float32)
        assert np.array_equal(np.array(got.behaviour_logprobs, dtype=np.float32), lp, equal_nan=True)


def test_each_malformation_has_its_own_reason():
    cases = {
        "empty": Trace("g", (1,), (), (), 0.0, 0),
        "length": Trace("g", (1,), (3, 4), (-1.0,), 0.0, 0),
        "nan_reward": Trace("g", (1,), (3,), (-1.0,), math.nan, 0),
        "positive_logprob": Trace("g", (1,), (3,), (0.5,), 0.0, 0),
        "versions": Trace("g", (1,), (3,), (-1.0,), 0.0, 2, policy_version_max=1),
        "fine": Trace("g", (1,), (3,), (-1.0,), 0.0, 0),
    }
    reasons = invalid_rows(traces_to_batch(list(cases.values())))
    assert "completion_ids is empty" in reasons[0]
    assert "behaviour_logprobs length differs" in reasons[1]
    assert "reward is not finite" in reasons[2]
    assert "finite log-probabilities <= 0" in reasons[3]
    assert "policy_version <= policy_version_max" in reasons[4]
    assert 5 not in reasons
    assert reasons[0].startswith(f"trace {cases['empty'].trace_id} (group g):")


def test_nulls_in_required_fields_are_invalid():
    batch = traces_to_batch([Trace("g", (1,), (3,), (-1.0,), 0.0, 0)] * 2)
    rewards = pa.array([0.0, None], pa.float32())
    batch = batch.set_column(batch.schema.get_field_index("reward"), batch.schema.field("reward"), rewards)
    reasons = invalid_rows(batch)
    assert list(reasons) == [1] and "reward is null" in reasons[1]


def test_schema_problem_names_missing_and_mistyped_fields():
    batch = traces_to_batch([Trace("g", (1,), (3,), (-1.0,), 0.0, 0)])
    assert schema_problem(batch) is None
    dropped = batch.drop_columns(["task"])
    assert "missing field 'task'" in schema_problem(dropped)
    wrong = batch.set_column(0, pa.field("trace_id", pa.large_string()), batch["trace_id"].cast(pa.large_string()))
    assert "field 'trace_id' is large_string, expected string" in schema_problem(wrong)
