"""The loop's reaction to learner steps skipped for NaN/inf: counted, logged with trace ids, and
`learner.max_consecutive_nonfinite` in a row stop the run (driven with the rank diagnostics, no Ray)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from learner.diagnostics import StepDiagnostics
from replay.parts import SampleMeta
from services.config import load_config
from services.evaluator import Evaluator
from services.learner_rank import RankStepResult
from services.loop import ActorLearnerLoop, LoopState
from services.publisher import Publisher
from services.report import MetricsLog
from services.train_flow import StepDone

OK = StepDiagnostics(skipped_nonfinite=0.0, loss=0.5, reward_mean=0.5)
NAN = StepDiagnostics(skipped_nonfinite=1.0, nonfinite_in_gradient=0.0, loss=float("nan"), reward_mean=0.5)


@pytest.fixture
def loop(tmp_path):
    lp = object.__new__(ActorLearnerLoop)
    lp.cfg = load_config(None, ["learner.max_consecutive_nonfinite=3", "run.max_learner_steps=100"])
    lp.s, lp.stop_reason = LoopState(), None
    lp.log = MetricsLog(tmp_path / "metrics.jsonl")
    lp.published = []
    lp.pool = SimpleNamespace(publish_must_wait=lambda: False)  # no re-formed weight group pending
    lp.publisher = Publisher([], lp.pool, lp.log, 1, fault=lambda at: None, get=lambda ref: ref)
    lp.evaluator = Evaluator(lp.pool, None, [], lp.log, lp.publisher.published_at, get=lambda ref: ref)
    lp.evaluator.initial_accuracy = 0.0
    lp._publish = lambda: lp.published.append(lp.s.steps)
    lp._progress_update = lambda rec: None
    lp._try_train = lambda: None
    return lp


class _FinishedStep:
    """Stands in for `TrainFlow` with one finished step: the ranks' results and the sample's meta."""

    def __init__(self, done: StepDone):
        self.done = done

    def finish(self) -> StepDone:
        return self.done


def _step(lp, diags: list[StepDiagnostics], batch: int) -> None:
    ids = [f"b{batch}-t{i}" for i in range(4)]
    meta = SampleMeta((("g0",), ("g1",)), (2, 2), (10, 10), (0, 0), (1.0, 1.0), (0,))
    results = [
        RankStepResult(d, (f"g{k}",), (0.5,), tuple(ids[2 * k : 2 * k + 2]) if d.skipped_nonfinite else ())
        for k, d in enumerate(diags)
    ]
    lp.train = _FinishedStep(StepDone(meta, results, lp.publisher.version, 100))
    lp._on_train_done()


def test_skips_are_counted_logged_and_reset_by_a_good_step(loop):
    _step(loop, [OK, OK], 0)
    _step(loop, [NAN, NAN], 1)
    _step(loop, [NAN, NAN], 2)
    _step(loop, [OK, OK], 3)
    assert loop.s.steps == 2 and loop.published == [1, 2]  # a skipped step neither counts nor publishes
    assert (loop.s.nonfinite_skipped, loop.s.consecutive_nonfinite, loop.s.traces_skipped_nonfinite) == (2, 0, 8)
    assert loop.stop_reason is None and not loop._done()
    loop.log.close()
    recs = [json.loads(x) for x in loop.log.path.read_text().splitlines()]
    skipped = [r for r in recs if r["kind"] == "nonfinite_step"]
    assert [r["trace_ids"] for r in skipped] == [[f"b{b}-t{i}" for i in range(4)] for b in (1, 2)]
    assert skipped[0]["learner_step"] == 1 and skipped[0]["loss"] == [None, None]  # NaN is written as null


def test_max_consecutive_nonfinite_stops_the_run(loop, caplog):
    _step(loop, [OK, OK], 0)
    for b in range(1, 3):
        _step(loop, [NAN, NAN], b)
        assert loop.stop_reason is None
    _step(loop, [OK, dataclasses.replace(NAN, nonfinite_in_gradient=1.0)], 3)  # any rank's skip skips the step
    assert loop.stop_reason == "nonfinite" and loop._done()
    assert "3 consecutive learner steps had a NaN/inf" in caplog.text
