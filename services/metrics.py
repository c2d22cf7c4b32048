"""Every Flywheel metric, named once here, recorded by the process that owns the fact.

Contract:
- `METRICS` lists each metric once: name, kind, tag keys and histogram buckets. Nothing else may
  create a metric; call sites use the `record_*` functions below with typed values.
- Recording goes through `ray.util.metrics`, so the node's metrics agent exports it on the port the
  cluster's Prometheus already scrapes (`ray start --metrics-export-port`). Prometheus sees
  `ray_<name>` for a gauge, `ray_<name>_total` for a counter and `ray_<name>_{bucket,sum,count}`
  for a histogram (`exported_names`); the dashboards and alert rules use exactly those names.
- Metrics recorded in the driver are exported too (it is a Ray core worker), but every metric the
  issue asks for is recorded in an actor, so a run exports them without any driver change.
- `serve_local(port)` additionally mirrors this process's records into a `prometheus_client`
  registry on 127.0.0.1:`port` under the same exported names (local runs without a Ray metrics port).
- Recording never decides control flow: a counter increment of 0 is dropped (Ray rejects it).
- Ray computes a histogram's `_sum` from bucket midpoints (Ray 2.60), so `_sum/_count` means are
  approximate; staleness buckets are centred on integers, so its mean is exact but for 0 (as 0.25).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal, Protocol

from rollout.passk import SOLVED_AT, default_ks, pass_at_k

if TYPE_CHECKING:
    from rollout.scored_batch import ScoredBatch

Kind = Literal["counter", "gauge", "histogram"]
RAY_PREFIX = "ray_"

# Buckets. Ray requires boundaries > 0; staleness buckets sit between integers so `le="k.5"`
# counts the groups k or fewer policy versions old.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKENS = tuple(float(2**i) for i in range(0, 16))
_VERSIONS = (0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 32.5, 64.5)
_AGE_SECONDS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


def _spec(name: str, kind: Kind, description: str, *tag_keys: str, boundaries: tuple[float, ...] = ()) -> MetricSpec:
    return MetricSpec(f"flywheel_{name}", kind, description, tuple(tag_keys), boundaries)


METRICS: tuple[MetricSpec, ...] = (
    # rollout (RolloutWorker)
    _spec("rollout_tokens", "counter", "completion tokens generated (rate = rollout tokens/s)", "worker"),
    _spec("rollout_traces", "counter", "traces generated and scored", "worker", "task"),
    _spec(
        "rollout_requests_in_flight",
        "gauge",
        "sequences in the engine right now (prompts x group_size while generating)",
        "worker",
    ),
    _spec(
        "rollout_generate_seconds", "histogram", "wall time of one batch's generation", "worker", boundaries=_SECONDS
    ),
    _spec(
        "rollout_queue_wait_seconds",
        "histogram",
        "time a finished batch waits for replay to accept it (back-pressure)",
        "worker",
        boundaries=_SECONDS,
    ),
    _spec(
        "rollout_completion_tokens", "histogram", "generation length per trace, tokens", "worker", boundaries=_TOKENS
    ),
    _spec("rollout_reward_mean", "gauge", "mean reward of the worker's last batch, per task", "worker", "task"),
    _spec(
        "rollout_gold_reward_mean", "gauge", "reward.kind=model: mean verifier (gold) score of the last batch", "worker"
    ),
    _spec("rollout_model_score_mean", "gauge", "reward.kind=model: mean raw reward-model score, last batch", "worker"),
    _spec("rollout_policy_version", "gauge", "policy_version of the weights in the worker's engine", "worker"),
    _spec(
        "rollout_last_active_timestamp_seconds",
        "gauge",
        "unix time the worker last finished a call (heartbeat)",
        "worker",
    ),
    # replay (ReplayShard, ReplayClient)
    _spec("replay_groups", "gauge", "groups held by the shard", "shard"),
    _spec("replay_traces", "gauge", "traces held by the shard", "shard"),
    _spec("replay_bytes", "gauge", "Arrow bytes held by the shard", "shard"),
    _spec("replay_inserted_groups", "counter", "groups accepted (rate = inserts/s)", "shard"),
    _spec("replay_sampled_groups", "counter", "groups handed to the learner (rate = samples/s)", "shard"),
    _spec(
        "replay_removed_groups",
        "counter",
        "groups removed, by reason: evicted_stale, evicted_capacity, removed_sampled",
        "shard",
        "reason",
    ),
    _spec(
        "replay_rejected_traces",
        "counter",
        "traces refused at insert, by reason (replay.rejections.RejectReason)",
        "shard",
        "reason",
    ),
    _spec(
        "replay_staleness",
        "histogram",
        "staleness of each sampled group, policy versions",
        "shard",
        boundaries=_VERSIONS,
    ),
    _spec("replay_sampled_staleness_max", "gauge", "largest staleness in the shard's last sample", "shard"),
    _spec("replay_staleness_bound", "gauge", "replay.max_staleness the shard enforces", "shard"),
    _spec(
        "replay_sample_age_seconds",
        "histogram",
        "seconds from a trace's creation to its sampling",
        "shard",
        boundaries=_AGE_SECONDS,
    ),
    _spec(
        "replay_insert_blocked_seconds", "counter", "seconds inserts waited for the rate limiter / capacity", "shard"
    ),
    # learner (LearnerRank)
    _spec("learner_steps", "counter", "optimiser steps taken", "rank"),
    _spec(
        "learner_last_step_timestamp_seconds", "gauge", "unix time of the rank's last finished step (heartbeat)", "rank"
    ),
    _spec(
        "learner_step_seconds",
        "histogram",
        "step time by phase: forward, backward_optimizer, total",
        "rank",
        "phase",
        boundaries=_SECONDS,
    ),
    _spec("learner_tokens", "counter", "response tokens trained on (rate = learner tokens/s)", "rank"),
    _spec("learner_loss", "gauge", "loss terms of the last step: total, policy, kl, entropy, value", "rank", "term"),
    _spec("learner_nonfinite_loss_steps", "counter", "steps whose total loss was NaN or infinite", "rank"),
    _spec(
        "learner_kl", "gauge", "mean per-token KL of the last step, against behaviour or reference", "rank", "against"
    ),
    _spec("learner_clip_fraction", "gauge", "fraction of tokens clipped in the last step, by side", "rank", "side"),
    _spec(
        "learner_importance_ratio",
        "gauge",
        "learner/behaviour importance ratio of the last step: mean, min, max",
        "rank",
        "stat",
    ),
    _spec(
        "learner_importance_ess", "gauge", "normalised effective sample size of the importance weights", "rank", "level"
    ),
    _spec("learner_entropy", "gauge", "mean token entropy of the last step", "rank"),
    _spec("learner_grad_norm", "gauge", "global gradient norm of the last step", "rank"),
    _spec("learner_lr", "gauge", "learning rate of the last step", "rank"),
    # weight sync (LearnerRank rank 0 sends, RolloutWorker receives; lag from the driver)
    _spec("weight_sync_send_seconds", "histogram", "seconds to broadcast one policy_version", boundaries=_SECONDS),
    _spec(
        "weight_sync_receive_seconds",
        "histogram",
        "seconds a worker spends receiving and loading one policy_version",
        "worker",
        boundaries=_SECONDS,
    ),
    _spec("weight_sync_bytes", "counter", "weight payload bytes broadcast"),
    _spec("weight_sync_errors", "counter", "broadcasts that failed"),
    _spec(
        "weight_sync_timeouts", "counter", "weight-sync collectives or receivers that timed out (group aborted)", "role"
    ),
    _spec(
        "weight_sync_blocked_seconds",
        "histogram",
        "seconds a publish held learner training (snapshot copy, or the whole send when not snapshotting)",
        boundaries=_SECONDS,
    ),
    _spec(
        "weight_sync_version_lag",
        "gauge",
        "latest published policy_version minus the worker's, at its last receive",
        "worker",
    ),
    # run level
    _spec("run_policy_version", "gauge", "latest published policy_version"),
    _spec("run_eval_accuracy", "gauge", "greedy held-out accuracy (pass@1) at run_eval_policy_version"),
    _spec("run_eval_policy_version", "gauge", "policy_version of the last evaluation"),
    _spec(
        "run_pass_at_k",
        "gauge",
        "unbiased pass@k over the worker's last batch of sampled groups (reward >= 1 counts as solved)",
        "worker",
        "k",
    ),
)
BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}


def exported_names(spec: MetricSpec) -> tuple[str, ...]:
    """The series names Prometheus shows for `spec` (Ray's prefix and type suffixes)."""
    base = RAY_PREFIX + spec.name
    if spec.kind == "counter":
        return (base + "_total",)
    if spec.kind == "histogram":
        return (base + "_bucket", base + "_sum", base + "_count")
    return (base,)


# ---- sinks ------------------------------------------------------------------------------------------
class Sink(Protocol):
    def record(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None: ...


class RaySink:
    """`ray.util.metrics` instruments, created once per process per metric.

    Ray 2.60's metrics agent drops a gauge series that its process has not set for about two export
    intervals (seen here: gone ~20 s after a single `set` while the actor lived on), so a daemon
    thread re-sets every gauge's last value each `refresh_s` (at most one export interval, 1 s
    minimum in Ray). A series still vanishes when its process dies ("rollout worker down" uses that).
    """

    def __init__(self, refresh_s: float = 1.0) -> None:
        self._instruments: dict[str, object] = {}
        self._gauges: dict[tuple[str, tuple], float] = {}  # (name, sorted tags) -> last value
        self._lock = threading.Lock()
        self._refresh_s = refresh_s
        self._refresher: threading.Thread | None = None

    def _keep_gauges(self) -> None:
        while True:
            time.sleep(self._refresh_s)
            with self._lock:
                last = list(self._gauges.items())
            for (name, tags), value in last:
                self._instruments[name].set(value, tags=dict(tags))

    def _instrument(self, spec: MetricSpec):
        with self._lock:
            inst = self._instruments.get(spec.name)
            if inst is None:
                from ray.util import metrics as rm

                if spec.kind == "histogram":
                    inst = rm.Histogram(
                        spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tag_keys
                    )
                else:
                    inst = (rm.Counter if spec.kind == "counter" else rm.Gauge)(
                        spec.name, spec.description, tag_keys=spec.tag_keys
                    )
                self._instruments[spec.name] = inst
            return inst

    def record(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        inst = self._instrument(spec)
        if spec.kind == "counter":
            inst.inc(value, tags=dict(tags))
        elif spec.kind == "gauge":
            inst.set(value, tags=dict(tags))
            with self._lock:
                self._gauges[(spec.name, tuple(sorted(tags.items())))] = value
                if self._refresher is None:
                    self._refresher = threading.Thread(target=self._keep_gauges, name="flywheel-gauges", daemon=True)
                    self._refresher.start()
        else:
            inst.observe(value, tags=dict(tags))


class PrometheusClientSink:
    """Mirror into a `prometheus_client` registry under the exported names (see `serve_local`)."""

    def __init__(self, registry=None) -> None:
        import prometheus_client as pc

        self.registry = registry if registry is not None else pc.CollectorRegistry()
        self._pc, self._instruments, self._lock = pc, {}, threading.Lock()

    def record(self, spec: MetricSpec, value: float, tags: Mapping[str, str]) -> None:
        with self._lock:
            inst = self._instruments.get(spec.name)
            if inst is None:
                pc, name, labels = self._pc, RAY_PREFIX + spec.name, list(spec.tag_keys)
                if spec.kind == "histogram":
                    inst = pc.Histogram(name, spec.description, labels, registry=self.registry, buckets=spec.boundaries)
                else:
                    inst = (pc.Counter if spec.kind == "counter" else pc.Gauge)(
                        name, spec.description, labels, registry=self.registry
                    )
                self._instruments[spec.name] = inst
        child = inst.labels(**tags) if spec.tag_keys else inst
        if spec.kind == "counter":
            child.inc(value)
        elif spec.kind == "gauge":
            child.set(value)
        else:
            child.observe(value)


_sinks: list[Sink] = [RaySink()]


def set_sinks(sinks: list[Sink]) -> list[Sink]:
    """Replace where records go in this process (tests install a fake); returns the previous list."""
    global _sinks
    old, _sinks = _sinks, list(sinks)
    return old


def serve_local(port: int, addr: str = "127.0.0.1") -> PrometheusClientSink:
    """Also serve this process's metrics with `prometheus_client` on addr:port; returns the sink."""
    import prometheus_client

    sink = PrometheusClientSink()
    sink.server, _ = prometheus_client.start_http_server(port, addr=addr, registry=sink.registry)
    _sinks.append(sink)
    return sink


def stop_local(sink: PrometheusClientSink) -> None:
    """Undo `serve_local`: stop recording into `sink` and close its HTTP server."""
    if sink in _sinks:
        _sinks.remove(sink)
    sink.server.shutdown()
    sink.server.server_close()


def emit(name: str, value: float, **tags: object) -> None:
    """Record one value of the metric `name` (without the `flywheel_` prefix); tags must match its keys."""
    spec = BY_NAME["flywheel_" + name]
    if set(tags) != set(spec.tag_keys):
        raise ValueError(f"metric {spec.name} takes tags {spec.tag_keys}, got {tuple(tags)}")
    value = float(value)
    if spec.kind == "counter" and not value > 0:
        return
    str_tags = {k: str(v) for k, v in tags.items()}
    for sink in _sinks:
        sink.record(spec, value, str_tags)


# ---- rollout ------------------------------------------------------------------------------------------
def rollout_started(worker_id: int, sequences: int) -> None:
    emit("rollout_requests_in_flight", sequences, worker=worker_id)


def record_rollout(
    worker_id: int, policy_version: int, sampled: ScoredBatch, generate_s: float, queue_wait_s: float
) -> None:
    """One finished rollout call: `sampled` is its `rollout.scored_batch.ScoredBatch` (whole scored groups)."""
    w = worker_id
    emit("rollout_requests_in_flight", 0, worker=w)
    emit("rollout_generate_seconds", generate_s, worker=w)
    emit("rollout_queue_wait_seconds", queue_wait_s, worker=w)
    emit("rollout_tokens", int(sampled.offsets[-1]), worker=w)
    for n in sampled.completion_lengths().tolist():
        emit("rollout_completion_tokens", n, worker=w)
    rewards: dict[str, list[float]] = {}
    for task, r in zip(sampled.row_tasks(), sampled.rewards.tolist()):
        rewards.setdefault(task, []).append(r)
    for task, rs in rewards.items():
        emit("rollout_traces", len(rs), worker=w, task=task)
        emit("rollout_reward_mean", sum(rs) / len(rs), worker=w, task=task)
    groups = sampled.group_rewards()  # [G, group_size]
    for k in default_ks(sampled.group_size) if sampled.num_groups else []:  # `services.evaluate`'s estimator
        est = [pass_at_k(len(g), int((g >= SOLVED_AT).sum()), k) for g in groups]
        emit("run_pass_at_k", sum(est) / len(est), worker=w, k=k)
    record_engine_version(w, policy_version)


def record_model_reward(worker_id: int, gold_mean: float | None, model_mean: float | None) -> None:
    """reward.kind=model: the gold (verifier) and proxy (reward-model) means of a batch, side by side."""
    if gold_mean is not None:
        emit("rollout_gold_reward_mean", gold_mean, worker=worker_id)
    if model_mean is not None:
        emit("rollout_model_score_mean", model_mean, worker=worker_id)


def record_engine_version(worker_id: int, policy_version: int, now: float | None = None) -> None:
    emit("rollout_policy_version", policy_version, worker=worker_id)
    emit("rollout_last_active_timestamp_seconds", time.time() if now is None else now, worker=worker_id)


def record_weights_received(worker_id: int, seconds: float, policy_version: int) -> None:
    emit("weight_sync_receive_seconds", seconds, worker=worker_id)
    record_engine_version(worker_id, policy_version)


def record_eval(policy_version: int, accuracy: float) -> None:
    emit("run_eval_accuracy", accuracy)
    emit("run_eval_policy_version", policy_version)


# ---- replay -------------------------------------------------------------------------------------------
def record_rejected(shard_id: int, result, traces_per_group: Mapping[str, int]) -> None:
    """`result` = an InsertResult; counts rejected traces by `RejectReason` label (replay/rejections.py)."""
    by_reason: dict[str, int] = {}
    for (gid, _), reason in zip(result.rejected, result.reasons, strict=True):
        by_reason[reason.value] = by_reason.get(reason.value, 0) + traces_per_group.get(gid, 1)
    for label, n in by_reason.items():
        emit("replay_rejected_traces", n, shard=shard_id, reason=label)


def record_shard_down(shard_id: int, traces: int) -> None:
    """Client side: an insert's part for a shard that is down (ReplayClient rejects it)."""
    emit("replay_rejected_traces", traces, shard=shard_id, reason="shard_down")


class ReplayMeter:
    """Turns one shard's cumulative `ReplayStats` into counter increments and gauges.

    Starts from the stats the shard has at construction, so a restarted shard (whose table restores
    its counts from disk) does not count its past again.
    """

    _REMOVED = ("evicted_stale", "evicted_capacity", "removed_sampled")

    def __init__(self, shard_id: int, max_staleness: int | None, stats) -> None:
        self.shard_id, self._last = shard_id, stats
        if max_staleness is not None:
            emit("replay_staleness_bound", max_staleness, shard=shard_id)
        self.update(stats)

    def update(self, stats) -> None:
        s, last = self.shard_id, self._last
        emit("replay_groups", stats.groups, shard=s)
        emit("replay_traces", stats.traces, shard=s)
        emit("replay_bytes", stats.bytes, shard=s)
        emit("replay_inserted_groups", stats.inserted_groups - last.inserted_groups, shard=s)
        emit("replay_sampled_groups", stats.sampled_groups - last.sampled_groups, shard=s)
        for reason in self._REMOVED:
            emit("replay_removed_groups", getattr(stats, reason) - getattr(last, reason), shard=s, reason=reason)
        self._last = stats

    def on_insert_blocked(self, seconds: float) -> None:
        emit("replay_insert_blocked_seconds", seconds, shard=self.shard_id)

    def on_sample(self, staleness: Iterable[int], created_at: Iterable[float], now: float) -> None:
        """`staleness` per sampled group, `created_at` per sampled trace (unix seconds)."""
        staleness = list(staleness)
        for st in staleness:
            emit("replay_staleness", st, shard=self.shard_id)
        if staleness:
            emit("replay_sampled_staleness_max", max(staleness), shard=self.shard_id)
        for t in created_at:
            emit("replay_sample_age_seconds", max(0.0, now - t), shard=self.shard_id)


# ---- learner and weight sync -------------------------------------------------------------------------
# diag key from learner.step / learner.objective -> (metric, tag key, tag value)
_LEARNER_GAUGES = {
    "loss": ("learner_loss", "term", "total"),
    "pg_loss": ("learner_loss", "term", "policy"),
    "kl_loss": ("learner_loss", "term", "kl"),
    "value_loss": ("learner_loss", "term", "value"),
    "kl_behaviour": ("learner_kl", "against", "behaviour"),
    "kl_ref": ("learner_kl", "against", "reference"),
    "clip_frac_low": ("learner_clip_fraction", "side", "low"),
    "clip_frac_high": ("learner_clip_fraction", "side", "high"),
    "clip_frac_dual": ("learner_clip_fraction", "side", "dual"),
    "rho_clip_frac": ("learner_clip_fraction", "side", "rho"),
    "is_ratio_mean": ("learner_importance_ratio", "stat", "mean"),
    "is_ratio_min": ("learner_importance_ratio", "stat", "min"),
    "is_ratio_max": ("learner_importance_ratio", "stat", "max"),
    "ess_token": ("learner_importance_ess", "level", "token"),
    "ess_seq": ("learner_importance_ess", "level", "sequence"),
    "entropy": ("learner_entropy", None, None),
    "grad_norm": ("learner_grad_norm", None, None),
    "lr": ("learner_lr", None, None),
}


# metrics.jsonl (record kind, field) -> (metric, tag value) that records the same fact: the file loggers
# (services/loggers.py) log it under the Prometheus name, so one name means one thing everywhere.
_RECORD_METRICS: dict[tuple[str, str], tuple[str, str | None]] = {
    ("eval", "accuracy"): ("run_eval_accuracy", None),
    ("eval", "policy_version"): ("run_eval_policy_version", None),
    ("learner_step", "policy_version"): ("run_policy_version", None),
    **{("learner_step", key): (metric, label) for key, (metric, _, label) in _LEARNER_GAUGES.items()},
}


def scalar_name(kind: str, field: str) -> str:
    """The logger name of metrics.jsonl's `field` in `kind` records: `flywheel_<metric>[/<tag value>]` where a
    Prometheus metric records it, else `<kind>/<field>`."""
    hit = _RECORD_METRICS.get((kind, field))
    if hit is None:
        return f"{kind}/{field}"
    metric, label = hit
    return f"flywheel_{metric}" + (f"/{label}" if label else "")


def record_learner_step(rank: int, diag: Mapping[str, float], now: float | None = None) -> None:
    """One optimiser step's diagnostics (`LearnerCore.train_step`'s `StepDiagnostics`, read as a mapping of the
    diagnostics it holds: objective keys + timings)."""
    for key, (metric, tag, label) in _LEARNER_GAUGES.items():
        if key in diag:
            emit(metric, diag[key], rank=rank, **({tag: label} if tag else {}))
    fwd, total = diag.get("forward_s"), diag.get("step_s")
    for phase, v in (
        ("forward", fwd),
        ("total", total),
        ("backward_optimizer", None if fwd is None or total is None else total - fwd),
    ):
        if v is not None:
            emit("learner_step_seconds", v, rank=rank, phase=phase)
    emit("learner_tokens", diag.get("tokens", 0.0), rank=rank)
    if not math.isfinite(diag.get("loss", 0.0)):
        emit("learner_nonfinite_loss_steps", 1, rank=rank)
    emit("learner_steps", 1, rank=rank)
    emit("learner_last_step_timestamp_seconds", time.time() if now is None else now, rank=rank)


def record_published(policy_version: int) -> None:
    emit("run_policy_version", policy_version)


def record_sent(seconds: float, nbytes: int) -> None:
    """Rank 0 after a broadcast (`learner.weight_transport.SyncStats`)."""
    emit("weight_sync_send_seconds", seconds)
    emit("weight_sync_bytes", nbytes)


def record_send_failed() -> None:
    emit("weight_sync_errors", 1)


def record_sync_timeout(role: str = "receiver") -> None:
    emit("weight_sync_timeouts", 1, role=role)


def record_publish_blocked(seconds: float) -> None:
    emit("weight_sync_blocked_seconds", seconds)


def record_version_lag(worker_id: int, worker_policy_version: int, latest_policy_version: int) -> None:
    """Driver side (the only process that knows both): the loop's latest version minus the worker's."""
    emit("weight_sync_version_lag", latest_policy_version - worker_policy_version, worker=worker_id)
