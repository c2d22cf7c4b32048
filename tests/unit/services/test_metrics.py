"""services/metrics.py: names, hand-computed values, and what each record_* call emits (through a fake sink)."""

from __future__ import annotations

import math
import re
import socket
import time
import urllib.request

import pytest

from replay.config import ReplayConfig
from replay.rejections import RejectReason
from replay.schema import Trace, traces_to_batch
from replay.table import InsertResult, ReplayTable
from rollout.scored_batch import ScoredBatch
from services import metrics

pytestmark = pytest.mark.prometheus


class ListSink:
    def __init__(self):
        self.records: list[tuple[str, float, dict]] = []

    def record(self, spec, value, tags):
        self.records.append((spec.name, value, dict(tags)))

    def values(self, name: str, **tags) -> list[float]:
        full = "flywheel_" + name
        return [v for n, v, t in self.records if n == full and all(t.get(k) == str(x) for k, x in tags.items())]


@pytest.fixture
def sink():
    s = ListSink()
    old = metrics.set_sinks([s])
    yield s
    metrics.set_sinks(old)


def _scored(traces: list[Trace], group_size: int) -> ScoredBatch:
    return ScoredBatch.from_traces(traces, group_size)


def _group(gid: str, rewards, version=0, task="arith", created_at=100.0, n_tokens=3) -> list[Trace]:
    return [
        Trace(
            group_id=gid,
            prompt_ids=(1, 2),
            completion_ids=tuple(range(n_tokens)),
            behaviour_logprobs=(-0.5,) * n_tokens,
            reward=r,
            policy_version=version,
            task=task,
            created_at=created_at,
        )
        for r in rewards
    ]


def test_names_are_unique_valid_and_exported_with_ray_suffixes():
    names = [m.name for m in metrics.METRICS]
    assert len(names) == len(set(names))
    for m in metrics.METRICS:
        assert re.fullmatch(r"flywheel_[a-z0-9_]+", m.name), m.name
        assert m.kind != "histogram" or (
            m.boundaries and all(b > 0 for b in m.boundaries) and list(m.boundaries) == sorted(m.boundaries)
        )
    assert metrics.exported_names(metrics.BY_NAME["flywheel_rollout_tokens"]) == ("ray_flywheel_rollout_tokens_total",)
    assert metrics.exported_names(metrics.BY_NAME["flywheel_replay_groups"]) == ("ray_flywheel_replay_groups",)
    assert metrics.exported_names(metrics.BY_NAME["flywheel_replay_staleness"]) == (
        "ray_flywheel_replay_staleness_bucket",
        "ray_flywheel_replay_staleness_sum",
        "ray_flywheel_replay_staleness_count",
    )


ISSUE_METRICS = {  # the issue's list, one metric per item
    "rollout_tokens",
    "rollout_requests_in_flight",
    "rollout_queue_wait_seconds",
    "rollout_completion_tokens",
    "rollout_reward_mean",
    "rollout_policy_version",
    "replay_groups",
    "replay_inserted_groups",
    "replay_sampled_groups",
    "replay_removed_groups",
    "replay_staleness",
    "replay_insert_blocked_seconds",
    "replay_rejected_traces",
    "learner_step_seconds",
    "learner_tokens",
    "learner_loss",
    "learner_kl",
    "learner_clip_fraction",
    "learner_importance_ess",
    "learner_grad_norm",
    "learner_lr",
    "weight_sync_send_seconds",
    "weight_sync_bytes",
    "weight_sync_version_lag",
    "run_policy_version",
    "run_eval_accuracy",
    "run_pass_at_k",
}


def test_issue_metrics_are_defined_with_their_tags():
    assert {"flywheel_" + n for n in ISSUE_METRICS} <= set(metrics.BY_NAME)
    tags = {n: metrics.BY_NAME["flywheel_" + n].tag_keys for n in ISSUE_METRICS}
    assert tags["rollout_reward_mean"] == ("worker", "task")
    assert tags["replay_removed_groups"] == ("shard", "reason") and tags["replay_rejected_traces"] == (
        "shard",
        "reason",
    )
    assert tags["weight_sync_version_lag"] == ("worker",) and tags["learner_step_seconds"] == ("rank", "phase")


def test_emit_checks_tags_and_drops_zero_counter_increments(sink):
    with pytest.raises(ValueError, match="takes tags"):
        metrics.emit("rollout_tokens", 1)
    with pytest.raises(KeyError):
        metrics.emit("no_such_metric", 1)
    metrics.emit("rollout_tokens", 0, worker=1)
    metrics.emit("rollout_tokens", 5, worker=1)
    assert sink.records == [("flywheel_rollout_tokens", 5.0, {"worker": "1"})]


def test_record_rollout_tokens_rewards_by_task_and_pass_at_k(sink):
    traces = _group("a", [1.0, 0.0, 0.0, 0.0], task="add", n_tokens=2) + _group(
        "b", [1.0, 1.0, 0.0, 0.0], task="mul", n_tokens=5
    )
    metrics.record_rollout(3, policy_version=7, sampled=_scored(traces, 4), generate_s=0.5, queue_wait_s=0.25)
    assert sink.values("rollout_tokens", worker=3) == [4 * 2 + 4 * 5]
    assert sink.values("rollout_reward_mean", worker=3, task="add") == [0.25]
    assert sink.values("rollout_reward_mean", worker=3, task="mul") == [0.5]
    assert sink.values("rollout_traces", worker=3, task="mul") == [4]
    assert sorted(sink.values("rollout_completion_tokens", worker=3)) == [2] * 4 + [5] * 4
    assert sink.values("run_pass_at_k", worker=3, k=1) == [pytest.approx((0.25 + 0.5) / 2)]
    assert sink.values("run_pass_at_k", worker=3, k=2) == [pytest.approx((0.5 + 5 / 6) / 2)]
    assert sink.values("run_pass_at_k", worker=3, k=4) == [1.0]
    assert sink.values("rollout_policy_version", worker=3) == [7]
    assert sink.values("rollout_requests_in_flight", worker=3) == [0]
    assert sink.values("rollout_queue_wait_seconds", worker=3) == [0.25]


def test_in_run_pass_at_k_is_the_evaluation_estimator(sink):
    from rollout import passk

    assert metrics.pass_at_k is passk.pass_at_k  # one estimator for Prometheus and `services.evaluate`
    traces = _group("a", [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], task="add", n_tokens=1)
    metrics.record_rollout(0, policy_version=0, sampled=_scored(traces, 6), generate_s=0.1, queue_wait_s=0.0)
    for k in (1, 2, 4, 6):
        assert sink.values("run_pass_at_k", worker=0, k=k) == [pytest.approx(passk.pass_at_k(6, 2, k))]
    metrics.record_rollout(1, policy_version=0, sampled=_scored([], 6), generate_s=0.1, queue_wait_s=0.0)  # all dropped
    assert sink.values("run_pass_at_k", worker=1, k=1) == []


def _rejections() -> dict[str, tuple]:
    """Real rejections written by replay.table, one per reason: label -> (reason, message)."""
    out = {}
    t = ReplayTable(ReplayConfig(capacity_groups=1, on_full="block", capacity_traces=4, max_staleness=None))
    assert t.insert(traces_to_batch(_group("a", [1.0] * 2))).accepted_groups == 1

    def first(res):
        return res.reasons[0], res.rejected[0][1]

    out["duplicate"] = first(t.insert(traces_to_batch(_group("a", [1.0] * 2))))
    out["full"] = first(t.insert(traces_to_batch(_group("b", [1.0] * 2))))
    out["too_large"] = first(t.insert(traces_to_batch(_group("c", [1.0] * 5))))
    out["invalid_trace"] = first(t.insert(traces_to_batch(_group("d", [math.nan] * 2))))
    bad = traces_to_batch(_group("e", [1.0])).drop_columns(["task"])
    out["bad_schema"] = first(t.insert(bad))
    limited = ReplayTable(
        ReplayConfig(samples_per_insert=1.0, error_buffer=1.0, min_size_to_sample=1, max_staleness=None)
    )
    results = [limited.insert(traces_to_batch(_group(f"g{i}", [1.0]))) for i in range(4)]
    out["rate_limited"] = next(first(r) for r in results if r.rejected)
    return out


def test_every_rejection_carries_its_reason_and_a_message():
    got = _rejections()
    assert len(got) == 6
    for label, (reason, message) in got.items():
        assert reason == RejectReason(label) and reason.value == label and len(message) > 20, (label, message)


def test_record_rejected_counts_traces_per_reason(sink):
    metrics.record_rejected(
        2,
        InsertResult(
            0,
            0,
            (("a", "rate limited: ..."), ("b", "rate limited: ..."), ("c", "trace x (group c): bad")),
            (RejectReason.RATE_LIMITED, RejectReason.RATE_LIMITED, RejectReason.INVALID_TRACE),
        ),
        {"a": 4, "b": 3, "c": 2},
    )
    assert sink.values("replay_rejected_traces", shard=2, reason="rate_limited") == [7]
    assert sink.values("replay_rejected_traces", shard=2, reason="invalid_trace") == [2]


def test_replay_meter_turns_cumulative_stats_into_increments(sink):
    cfg = ReplayConfig(max_staleness=1, max_times_sampled=1)
    table = ReplayTable(cfg, shard_id=5)
    meter = metrics.ReplayMeter(5, cfg.max_staleness, table.stats())
    assert sink.values("replay_staleness_bound", shard=5) == [1]
    for i, version in enumerate([0, 0, 2, 2]):
        table.insert(traces_to_batch(_group(f"g{i}", [1.0, 0.0], version=version, created_at=10.0)))
    meter.update(table.stats())
    assert sink.values("replay_inserted_groups", shard=5) == [4]
    assert sink.values("replay_groups", shard=5)[-1] == 4
    res = table.sample(1, policy_version=2)  # evicts g0 and g1 (staleness 2 > 1), then samples g2 (fifo)
    meter.on_sample(res.staleness, res.batch.column("created_at").to_pylist(), now=12.5)
    meter.update(table.stats())
    assert sink.values("replay_removed_groups", shard=5, reason="evicted_stale") == [2]
    assert sink.values("replay_removed_groups", shard=5, reason="removed_sampled") == [1]
    assert sink.values("replay_sampled_groups", shard=5) == [1]
    assert sink.values("replay_staleness", shard=5) == [0]
    assert sink.values("replay_sample_age_seconds", shard=5) == [2.5, 2.5]
    assert sink.values("replay_groups", shard=5)[-1] == 1
    meter.update(table.stats())  # nothing changed: no new increments
    assert sink.values("replay_sampled_groups", shard=5) == [1]
    # a restarted shard starts from its restored counts: nothing counted twice
    sink.records.clear()
    metrics.ReplayMeter(5, None, table.stats())
    assert sink.values("replay_inserted_groups", shard=5) == [] and sink.values("replay_groups", shard=5) == [1]


def test_record_learner_step_maps_diagnostics(sink):
    diag = {
        "loss": 0.5,
        "pg_loss": 0.4,
        "kl_loss": 0.1,
        "kl_behaviour": 0.01,
        "clip_frac_low": 0.1,
        "clip_frac_high": 0.2,
        "ess_seq": 0.9,
        "ess_token": 0.95,
        "is_ratio_mean": 1.01,
        "entropy": 1.5,
        "grad_norm": 3.0,
        "lr": 1e-4,
        "tokens": 128.0,
        "forward_s": 0.2,
        "step_s": 0.5,
        "adv_mean": 0.0,
    }
    metrics.record_learner_step(1, diag, now=1000.0)
    assert sink.values("learner_loss", rank=1, term="total") == [0.5]
    assert sink.values("learner_loss", rank=1, term="policy") == [0.4]
    assert sink.values("learner_kl", rank=1, against="behaviour") == [0.01]
    assert sink.values("learner_clip_fraction", rank=1, side="high") == [0.2]
    assert sink.values("learner_importance_ess", rank=1, level="sequence") == [0.9]
    assert sink.values("learner_step_seconds", rank=1, phase="backward_optimizer") == [pytest.approx(0.3)]
    assert sink.values("learner_tokens", rank=1) == [128.0]
    assert sink.values("learner_steps", rank=1) == [1.0]
    assert sink.values("learner_last_step_timestamp_seconds", rank=1) == [1000.0]
    assert sink.values("learner_nonfinite_loss_steps", rank=1) == []
    metrics.record_learner_step(1, {"loss": math.nan, "tokens": 1.0})
    assert sink.values("learner_nonfinite_loss_steps", rank=1) == [1.0]


def test_weight_sync_and_run_level(sink):
    metrics.record_published(4)
    metrics.record_sent(0.2, 1 << 20)
    metrics.record_weights_received(2, 0.3, 4)
    metrics.record_version_lag(2, worker_policy_version=3, latest_policy_version=5)
    metrics.record_eval(4, 0.75)
    assert sink.values("run_policy_version") == [4]
    assert sink.values("weight_sync_bytes") == [1 << 20]
    assert sink.values("weight_sync_receive_seconds", worker=2) == [0.3]
    assert sink.values("rollout_policy_version", worker=2) == [4]
    assert sink.values("weight_sync_version_lag", worker=2) == [2]
    assert sink.values("run_eval_accuracy") == [0.75] and sink.values("run_eval_policy_version") == [4]


def test_serve_local_exposes_the_same_exported_names(sink):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    local = metrics.serve_local(port)
    try:
        metrics.emit("rollout_tokens", 5, worker=0)
        metrics.emit("replay_groups", 3, shard=1)
        metrics.emit("replay_staleness", 1, shard=1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.stop_local(local)
    assert metrics.set_sinks([sink]) == [sink]  # stop_local took the local sink out again
    assert 'ray_flywheel_rollout_tokens_total{worker="0"} 5.0' in text
    assert 'ray_flywheel_replay_groups{shard="1"} 3.0' in text
    assert 'ray_flywheel_replay_staleness_bucket{le="1.5",shard="1"} 1.0' in text
    assert 'ray_flywheel_replay_staleness_bucket{le="0.5",shard="1"} 0.0' in text
    with pytest.raises(OSError):  # the server is closed
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_ray_sink_keeps_re_setting_gauges():
    """Ray drops a gauge ~20 s after its last set; the sink re-sets the last value until the process ends."""

    class FakeGauge:
        def __init__(self):
            self.calls = []

        def set(self, value, tags):
            self.calls.append((value, tags))

    sink, gauge = metrics.RaySink(refresh_s=0.02), FakeGauge()
    sink._instruments["flywheel_replay_groups"] = gauge  # stands in for the ray.util.metrics.Gauge
    sink.record(metrics.BY_NAME["flywheel_replay_groups"], 3.0, {"shard": "0"})
    sink.record(metrics.BY_NAME["flywheel_replay_groups"], 4.0, {"shard": "0"})
    time.sleep(0.3)
    assert gauge.calls[:2] == [(3.0, {"shard": "0"}), (4.0, {"shard": "0"})]
    assert len(gauge.calls) >= 5 and all(c == (4.0, {"shard": "0"}) for c in gauge.calls[2:])
