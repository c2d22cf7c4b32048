"""`TrainFlow` without Ray: a fake replay that cuts real samples into parts, fake ranks that train on them.

Checks: payloads go replay -> rank (the flow only holds metas and refs), the next sample is drawn while
a step trains and for the predicted version, a prefetch that the learner's version outran is re-checked
against max_staleness, nothing is prefetched when prefetch is off, and priorities go back to replay.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from learner.diagnostics import StepDiagnostics
from replay.config import ReplayConfig
from replay.parts import RankPart, join_parts, split_for_ranks
from replay.synthetic import group_batch
from replay.table import ReplayTable
from services.learner_rank import RankStepResult
from services.train_flow import TrainFlow


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A stand-in ObjectRef: the flow may pass it on but must not look inside."""

    value: object


@dataclasses.dataclass
class _Routed:
    meta: object
    parts: list


class FakeReplay:
    def __init__(self, cfg: ReplayConfig, groups: int):
        self.table = ReplayTable(cfg)
        self.table.insert(group_batch([f"g{i:02d}" for i in range(groups)], group_size=2))
        self.draws: list[int] = []  # policy_version of each draw
        self.priorities: dict[str, float] = {}

    def sample_to_ranks(self, n_groups, policy_version, ranks, timeout_s=0.0):
        self.draws.append(policy_version)
        result = self.table.sample(n_groups, policy_version)
        if result is None:
            return None
        meta, parts = split_for_ranks(result, ranks)
        return _Routed(meta, [[_Ref(p)] for p in parts])

    def update_priorities_async(self, group_ids, priorities):
        self.priorities.update(zip(group_ids, priorities))


class FakeRank:
    def __init__(self):
        self.trained: list[pa.Table] = []
        self.train_step = self  # `rank.train_step.remote(*refs)`

    def remote(self, *refs):
        part = join_parts([r.value for r in refs])  # what Ray resolves in the rank's process
        assert isinstance(part, RankPart)
        self.trained.append(part.traces)
        gids = tuple(dict.fromkeys(part.traces.column("group_id").to_pylist()))
        return _Ref(RankStepResult(StepDiagnostics(loss=0.0), gids, tuple(float(len(g)) for g in gids)))


def _flow(prefetch=True, max_staleness=4, groups=12, sampler="fifo"):
    replay = FakeReplay(ReplayConfig(max_staleness=max_staleness, sampler=sampler), groups)
    ranks = [FakeRank(), FakeRank()]
    flow = TrainFlow(replay, ranks, 4, max_staleness, prefetch, sampler == "prioritized", get=_get)
    return flow, replay, ranks


def _get(refs):
    return [r.value for r in refs]


def test_step_reaches_every_rank_and_prefetch_draws_for_the_predicted_version():
    flow, replay, ranks = _flow()
    meta = flow.start(0)
    assert meta.num_groups == 4 and all(len(r.trained) == 1 for r in ranks)
    flow.prefetch(1)  # the learner will publish version 1 before the next step
    assert replay.draws == [0, 1] and flow.prefetched_groups() == 4
    done = flow.finish()
    assert [len(r.group_ids) for r in done.results] == [2, 2] and done.driver_bytes > 0
    assert flow.start(1).group_ids == flow.inflight.meta.group_ids and replay.draws == [0, 1]  # no new draw
    trained = {g for r in ranks for t in r.trained for g in t.column("group_id").to_pylist()}
    assert len(trained) == 8


def test_driver_side_never_holds_trace_payloads():
    flow, _, _ = _flow()
    flow.start(0)
    flow.prefetch(0)
    done = flow.finish()
    # everything the flow fetched is ids and numbers: a few hundred bytes, against KBs of token ids per step
    assert done.driver_bytes < 2000
    assert not any(isinstance(v, (pa.Table, pa.RecordBatch)) for v in vars(done.meta).values())


def test_prefetch_outrun_by_the_learner_is_dropped_if_it_breaks_max_staleness():
    flow, replay, _ = _flow(max_staleness=1)
    flow.start(0)
    flow.prefetch(0)  # predicted: no publish
    flow.finish()
    meta = flow.start(2)  # two versions were published meanwhile: staleness 0 + 2 > 1
    assert flow.dropped_prefetches == 1 and replay.draws == [0, 0, 2] and meta is None  # table evicted v0 groups


def test_prefetch_outrun_within_the_bound_is_kept_with_true_staleness():
    flow, _, _ = _flow(max_staleness=4)
    flow.start(0)
    flow.prefetch(0)
    flow.finish()
    meta = flow.start(1)
    assert flow.dropped_prefetches == 0 and meta.staleness == (1, 1, 1, 1)


def test_no_prefetch_when_off_synchronous():
    flow, replay, _ = _flow(prefetch=False)
    flow.start(0)
    flow.prefetch(1)
    assert flow.prefetched is None and replay.draws == [0]


def test_priorities_go_back_to_replay_only_for_the_prioritized_sampler():
    flow, replay, _ = _flow(sampler="prioritized")
    flow.start(0)
    flow.finish()
    assert len(replay.priorities) == 4 and all(p == 3.0 for p in replay.priorities.values())
    flow, replay, _ = _flow()
    flow.start(0)
    flow.finish()
    assert replay.priorities == {}
