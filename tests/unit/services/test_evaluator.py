"""`Evaluator` without Ray: a fake worker pool whose handles return refs that `get` resolves (or that raise
the actor-died error, as `ray.get` does for a worker killed mid-eval)."""

from __future__ import annotations

import json
import math

import pytest
from ray.exceptions import ActorDiedError

from services.evaluator import TARGET_GAIN, Evaluator
from services.report import MetricsLog


class _Ref:
    def __init__(self, value):
        self.value = value


class _Method:
    def __init__(self, fn):
        self.remote = fn


class _Worker:
    """Evaluates to the next scripted (version, accuracy) — or an exception — and records how it was asked."""

    def __init__(self, results: list):
        self.results, self.calls = list(results), []
        self.evaluate = _Method(lambda problems: self._call("evaluate", problems))
        self.evaluate_published = _Method(lambda weights, problems: self._call("evaluate_published", weights))

    def _call(self, how, arg):
        self.calls.append((how, arg))
        return _Ref(self.results.pop(0))


class _Pool:
    def __init__(self, workers: dict, dedicated: bool = False):
        self.workers, self.dedicated_eval, self.failed = workers, dedicated, []

    def eval_worker(self):
        return min(self.workers.items()) if self.workers else None

    def on_failed(self, wid, err, during):
        self.failed.append((wid, during))
        del self.workers[wid]


class _Rank0:
    published_weights = _Method(lambda: "rank0-snapshot-ref")


def _get(ref):
    if isinstance(ref.value, BaseException):
        raise ref.value
    return ref.value


def _evaluator(tmp_path, pool, publish_t=None):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    publish_t = publish_t or {0: 0.0, 1: 1.5, 2: 3.0, 3: 4.5}
    ev = Evaluator(pool, _Rank0(), ["p0", "p1"], log, publish_t.__getitem__, get=_get)
    return ev, log


def _evals(log) -> list[dict]:
    log.close()
    return [r for r in map(json.loads, log.path.read_text().splitlines()) if r["kind"] == "eval"]


def _finish_all(ev):
    ev.process(set(ev.refs()))


def test_initial_eval_then_published_versions_are_recorded_with_their_publish_times(tmp_path):
    worker = _Worker([(0, 0.25), (1, 0.30), (2, 0.46)])
    ev, log = _evaluator(tmp_path, _Pool({0: worker}))
    assert ev.run_initial() == 0.25 and log.now() < 1.0  # the RL clock restarted after the version-0 eval
    for _ in range(2):
        ev.request()
        assert ev.busy
        _finish_all(ev)
    assert not ev.busy and ev.s.evals == [(1, 1.5, 0.30), (2, 3.0, 0.46)] and ev.last_version() == 2
    assert ev.s.seconds_to_target == 3.0  # 0.46 >= 0.25 + 0.20: the publish time of version 2
    assert ev.gained(TARGET_GAIN) and not ev.gained(0.25) and ev.latest_accuracy() == 0.46
    recs = _evals(log)
    assert [(r["policy_version"], r["accuracy"], r["t_published"]) for r in recs] == [
        (0, 0.25, 0.0),
        (1, 0.30, 1.5),
        (2, 0.46, 3.0),
    ]
    assert "worker" not in recs[0] and recs[1]["worker"] == 0 and recs[1]["eval_s"] >= 0.0
    assert [how for how, _ in worker.calls] == ["evaluate"] * 3


def test_summary_final_is_the_newest_version_and_best_the_maximum(tmp_path):
    ev, _ = _evaluator(tmp_path, _Pool({0: _Worker([(0, 0.4), (2, 0.5), (1, 0.7)])}))
    ev.run_initial()
    ev.request()
    ev.request()  # two evals out at once: version 2's result comes back before version 1's
    _finish_all(ev)
    summary = ev.summary()
    got = (summary["eval_accuracy_initial"], summary["eval_accuracy_final"], summary["eval_accuracy_best"])
    assert got == (0.4, 0.5, 0.7)  # final by version, not by arrival; best over every version
    assert summary["rl_seconds_to_target"] == 1.5 and summary["target_gain"] == TARGET_GAIN  # version 1: 0.7 >= 0.6
    assert ev.last_version() == 2 and ev.latest_accuracy() == 0.7  # the bar shows the latest result to arrive


def test_summary_with_nothing_published_reports_the_starting_accuracy(tmp_path):
    ev, _ = _evaluator(tmp_path, _Pool({0: _Worker([(0, 0.3)])}))
    ev.run_initial()
    summary = ev.summary()
    assert summary["eval_accuracy_final"] == summary["eval_accuracy_best"] == 0.3 and ev.latest_accuracy() == 0.3
    assert ev.last_version() == 0 and not ev.gained(0.0)


def test_an_eval_with_no_worker_is_owed_and_sent_when_one_is_back(tmp_path):
    pool = _Pool({})
    ev, _ = _evaluator(tmp_path, pool)
    ev.initial_accuracy = 0.1
    ev.request()
    assert ev.owed and not ev.busy
    ev.tick()
    assert ev.owed and not ev.busy  # still nobody
    pool.workers[3] = _Worker([(1, 0.2)])
    ev.tick()
    assert not ev.owed and ev.busy
    _finish_all(ev)
    assert ev.s.evals == [(1, 1.5, 0.2)]


def test_a_worker_dying_mid_eval_is_reported_and_the_eval_goes_to_the_next(tmp_path):
    pool = _Pool({0: _Worker([ActorDiedError()]), 1: _Worker([(1, 0.6)])})
    ev, log = _evaluator(tmp_path, pool)
    ev.initial_accuracy = 0.3
    ev.request()
    _finish_all(ev)  # worker 0's eval raised: the pool replaces it, the eval is re-sent to worker 1
    assert pool.failed == [(0, "eval")] and ev.busy
    _finish_all(ev)
    assert ev.s.evals == [(1, 1.5, 0.6)] and ev.s.seconds_to_target == 1.5
    assert [r["worker"] for r in _evals(log)] == [1]


def test_a_learner_side_error_is_not_swallowed(tmp_path):
    ev, _ = _evaluator(tmp_path, _Pool({0: _Worker([ValueError("verifier bug")])}))
    ev.request()
    with pytest.raises(ValueError, match="verifier bug"):
        _finish_all(ev)


def test_the_dedicated_eval_worker_gets_rank_0s_published_snapshot(tmp_path):
    worker = _Worker([(2, 0.5)])
    ev, _ = _evaluator(tmp_path, _Pool({9: worker}, dedicated=True))
    ev.initial_accuracy = math.nan  # a resumed run restores it from loop.json; nan compares False
    ev.request()
    _finish_all(ev)
    assert worker.calls == [("evaluate_published", "rank0-snapshot-ref")] and ev.s.evals == [(2, 3.0, 0.5)]
    assert ev.s.seconds_to_target is None
