"""The actor-learner loop the driver runs: dispatch, sample, train, publish, evaluate — as named steps.

Components: `TrainFlow` (services/train_flow.py: sample -> ranks -> results, next sample prefetched),
`WorkerPool` (dispatch and membership), `Publisher` (services/publisher.py: versions, broadcasts),
`Evaluator` (services/evaluator.py: eval scheduling and accuracy bookkeeping), `Checkpointer` (public
`broadcast` / `settle_weights` / `persisted_state` on resume), the fault hook (services/faults.py, a no-op
in production). The loop waits on their refs with
`ray.wait(num_returns=1)` and polls control at most every `CONTROL_POLL_S`.

Invariants:
- trace payloads never pass through the driver: replay hands each rank its token-balanced part as a ref;
  the driver sees ids, counts, staleness and weights (replay/parts.py `SampleMeta`);
- at most one learner step is in flight; every rank trains on its own whole groups of one sample;
- `policy_version` is published in order 1, 2, ...; a weight receive is queued on every worker
  right after a publish, so any rollout dispatched later runs on the new weights;
- rollout runs at most `run.max_buffered_steps` learner steps of groups ahead of the learner; with
  `replay.max_staleness: 0` it only produces for the current version (synchronous baseline);
- a step skipped for a NaN/inf loss or gradient changes nothing but counters and is logged with its
  trace ids; `learner.max_consecutive_nonfinite` of them in a row stop the run (with a checkpoint);
- checkpoints and resume: services/checkpoint.py (taken right after a publish, and at a clean stop).
- the rollout workers are a changing set (services/worker_pool.py): dead ones are replaced and their
  unfinished prompts re-issued, `flywheel scale` changes their number (services/control.py), and the
  weight group is re-formed at a version boundary when its members change. While such a re-formed
  broadcast is out, a due publish waits (training does not), so the learner never blocks on a joiner.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import ray

from learner.diagnostics import StepDiagnostics, reduce_step_diagnostics
from services import faults
from services.checkpoint import Checkpointer, ResumePoint
from services.config import RunConfig
from services.control import ControlClient, start_control
from services.evaluator import EvalState, Evaluator
from services.loggers import make_loggers
from services.placement import start_actors
from services.publisher import Publisher, PublishState
from services.report import MetricsLog, draw_report, format_summary
from services.train_flow import TrainFlow
from services.worker_pool import WorkerPool

log = logging.getLogger(__name__)

CONTROL_POLL_S = 0.25  # longest wait for a ref before polling control (scale, dead workers); refs wake it sooner


@dataclasses.dataclass
class LoopState:
    """The loop's own counters (the publisher's and evaluator's state sit beside them in loop.json)."""

    steps: int = 0
    traces_consumed: int = 0
    groups_consumed: int = 0
    max_staleness_seen: int = 0
    versions_consumed: set = dataclasses.field(default_factory=set)
    produced_at: dict = dataclasses.field(default_factory=dict)  # version -> groups produced
    reward_failures: dict = dataclasses.field(
        default_factory=lambda: dict.fromkeys(
            ("reward_timeouts", "reward_errors", "reward_nonfinite", "dropped_groups", "uniform_groups"), 0
        )
    )
    nonfinite_skipped: int = 0  # learner steps skipped for NaN/inf (their traces were sampled, not trained on)
    consecutive_nonfinite: int = 0
    traces_skipped_nonfinite: int = 0
    cursors: dict = dataclasses.field(default_factory=dict)  # worker_id -> (problems_drawn, batches)
    resumes: int = 0


class ActorLearnerLoop:
    def __init__(
        self, cfg: RunConfig, run_dir: Path, model_dir: Path, cache_dir: Path, resume: ResumePoint | None = None
    ):

        self.cfg, self.run_dir, self.model_dir = cfg, run_dir, model_dir
        loggers = make_loggers(cfg.run.loggers, cfg.run.wandb, run_dir, cfg.run.name, cfg.model_dump(mode="json"))
        self.log = MetricsLog(run_dir / "metrics.jsonl", loggers)
        self.control = ControlClient(start_control(cfg.run.name, cfg.rollout.num_workers))
        self.startup_deaths: list = []  # workers replaced during start-up, logged once the RL clock starts
        self.replay, self.ranks, workers = start_actors(cfg, model_dir, cache_dir, on_death=self.startup_deaths.append)
        self.pool = WorkerPool(cfg, workers, self.replay, self.ranks[0], model_dir, cache_dir, self.log)
        self.fault_hook = faults.hook(self.pool)  # test hook (services/faults.py); production: a no-op
        self.s = LoopState()
        every = cfg.learner.weight_sync.sync_every_steps
        self.publisher = Publisher(self.ranks, self.pool, self.log, every, lambda at: self._inject_fault(at, None))
        self.evaluator = Evaluator(
            self.pool, self.ranks[0], self.pool.task.eval_set(), self.log, self.publisher.published_at
        )
        lc = cfg.learner
        self.train = TrainFlow(
            self.replay,
            self.ranks,
            lc.groups_per_step,
            cfg.replay.max_staleness,
            prefetch=not cfg.synchronous,
            feed_priorities=cfg.replay.sampler == "prioritized",
        )
        self.held_groups = 0  # replay's last reported count plus groups accepted since (no per-tick stats() RPCs)
        self.stop_reason: str | None = None
        self.ckpt = Checkpointer(self, resume)

    # -- the loop -------------------------------------------------------------------------------
    def run(self, job_started: float, cold_start_s: float) -> dict:
        try:
            if self.ckpt.resume is not None:
                self.ckpt.restore()
                self.s.resumes += 1
            else:
                self.evaluator.run_initial()  # the version-0 eval; the RL clock starts after it
            self.pool.record_startup_deaths(self.startup_deaths)
            self._progress_start()
            while not self._done():
                self._membership_tick()
                self._dispatch_rollouts()
                self._try_train()
                self._collect(timeout_s=CONTROL_POLL_S)
            self._drain_and_publish_final()
            summary = self._finish(job_started, cold_start_s)
        finally:
            self._shutdown()
        return summary

    def _done(self) -> bool:
        run = self.cfg.run
        if self.stop_reason is not None or self.s.steps >= run.max_learner_steps or self.log.now() >= run.max_wall_s:
            return True
        return run.stop_at_gain is not None and self.evaluator.gained(run.stop_at_gain)

    # -- rollout ----------------------------------------------------------------------------------
    def _groups_per_call(self) -> int:
        return self.cfg.rollout.prompts_per_step

    def _may_dispatch(self) -> bool:
        lc, inflight = self.cfg.learner, self.pool.inflight_prompts()
        if self.cfg.synchronous:
            need = lc.groups_per_step * lc.weight_sync.sync_every_steps
            return self.s.produced_at.get(self.publisher.version, 0) + inflight < need
        held = self.held_groups + self.train.prefetched_groups()
        return held + inflight < self.cfg.run.max_buffered_steps * lc.groups_per_step

    def _dispatch_rollouts(self) -> None:
        for wid in self.pool.idle_active():
            if self._may_dispatch():
                self.pool.dispatch(wid, self._groups_per_call())
                self._inject_fault("rollout", wid)

    def _on_rollout(self, st) -> None:
        self.s.produced_at[st.policy_version] = self.s.produced_at.get(st.policy_version, 0) + st.accepted_groups
        self.held_groups += st.accepted_groups
        drawn = self.pool.drawn.get(st.worker_id, 0)  # the worker's prompt cursor (its stream lives in the pool)
        self.s.cursors[st.worker_id] = (drawn, st.batches)
        for key in self.s.reward_failures:
            self.s.reward_failures[key] += getattr(st, key)
        self.log.write("rollout", **dataclasses.asdict(st), problems_drawn=drawn)

    # -- learner ----------------------------------------------------------------------------------
    def _try_train(self) -> None:
        if self.train.busy:
            return
        meta = self.train.start(self.publisher.version)
        self.held_groups = self.replay.groups_known()  # the draw just refreshed the shards' counts
        if meta is None:
            return
        self.s.versions_consumed.update(meta.policy_versions)
        self._prefetch()

    def _prefetch(self) -> None:
        """Draw the next step's sample while this one trains, for the version the learner will then hold.

        Not when the next step will not run here (the run's last step) or a checkpoint follows this step:
        a checkpoint must not miss groups that left replay but were not trained on."""
        s, every = self.s, self.cfg.learner.weight_sync.sync_every_steps
        after = s.steps + 1
        publishes = after % every == 0
        if after >= self.cfg.run.max_learner_steps or (publishes and self.ckpt.due_at(after)):
            return
        self.train.prefetch(self.publisher.version + int(publishes))

    def _on_train_done(self) -> None:
        done = self.train.finish()
        diags = [r.diagnostics for r in done.results]
        if any(d.skipped_nonfinite for d in diags):
            self._on_nonfinite(diags, [t for r in done.results for t in r.skipped_trace_ids])
        else:
            self._on_step(done, diags)
        if not self._done():
            self._try_train()  # the prefetched sample goes out at once: the ranks do not wait on the driver

    def _on_step(self, done, diags: list[StepDiagnostics]) -> None:
        s, meta = self.s, done.meta
        s.consecutive_nonfinite = 0
        s.steps += 1
        s.traces_consumed += sum(meta.traces)
        s.groups_consumed += meta.num_groups
        s.max_staleness_seen = max(s.max_staleness_seen, max(meta.staleness))
        merged = reduce_step_diagnostics(diags)  # each field by its declared reduction (mean by tokens, sum, ...)
        rec = self.log.write(
            "learner_step",
            learner_step=s.steps,
            policy_version=self.publisher.version,
            staleness_mean=sum(meta.staleness) / len(meta.staleness),
            staleness_max=max(meta.staleness),
            trace_versions=list(meta.policy_versions),
            replay_weight_mean=sum(meta.group_weights) / len(meta.group_weights),
            rank_tokens=list(meta.tokens),
            driver_bytes=done.driver_bytes,
            **merged.as_dict(),
        )
        self._progress_update(rec)
        if self.publisher.on_step(s.steps):
            self._maybe_publish()

    def _on_nonfinite(self, diags: list[StepDiagnostics], trace_ids: list[str]) -> None:
        s, limit = self.s, self.cfg.learner.max_consecutive_nonfinite
        s.nonfinite_skipped += 1
        s.consecutive_nonfinite += 1
        s.traces_skipped_nonfinite += len(trace_ids)
        self.log.write(
            "nonfinite_step",
            learner_step=s.steps,
            policy_version=self.publisher.version,
            consecutive=s.consecutive_nonfinite,
            in_gradient=any(d.nonfinite_in_gradient for d in diags),
            loss=[d.loss for d in diags],
            trace_ids=trace_ids,
        )
        if s.consecutive_nonfinite >= limit:
            self.stop_reason = "nonfinite"
            log.error(
                f"{limit} consecutive learner steps had a NaN/inf loss or gradient (learner.max_consecutive_nonfinite="
                f"{limit}); stopping with a checkpoint. Their trace ids are in {self.log.path} (kind=nonfinite_step)"
            )

    # -- weights and eval -------------------------------------------------------------------------
    def _maybe_publish(self) -> None:
        if self.publisher.may_publish():
            self._publish()

    def broadcast(self, version: int) -> None:
        """Send the learner's weights as `version` to every worker (the checkpointer re-sends them on resume)."""
        self.publisher.broadcast(version)

    def _publish(self) -> None:
        self.publisher.publish()
        if self.s.steps % self.cfg.run.eval_every_steps == 0 or self._done():
            self.evaluator.request()
        if self.ckpt.due():
            self.ckpt.save("periodic")

    # -- membership -------------------------------------------------------------------------------
    def _membership_tick(self) -> None:
        """Scale to the control actor's target, replace the dead, and get joiners the weights."""
        target = self.control.poll(self.pool.report)
        if target is not None:
            self.pool.set_target(target)
        self.pool.reconcile()
        self.evaluator.tick()
        self._maybe_publish()
        version = self.publisher.version
        if not (self.publisher.due or self.train.busy or self.pool.receiving()) and self.pool.m.wants_weights(version):
            if self.publisher.unpublished(self.s.steps):  # unpublished steps: a new version
                self._publish()
            else:  # the learner holds exactly policy_version: send it again over the re-formed group
                self.broadcast(version)

    def _inject_fault(self, at: str, wid: int | None) -> None:
        self.fault_hook(at, wid, self.s.steps)

    # -- plumbing ---------------------------------------------------------------------------------
    def _collect(self, timeout_s: float) -> None:
        """Wake on the first finished ref (rollout, train step, publish, eval) or after `timeout_s`, the
        control-polling interval (scale requests, dead workers); then handle everything already done."""
        refs = self.pool.refs() + self.train.refs() + self.publisher.refs() + self.evaluator.refs()
        if not refs:
            time.sleep(timeout_s)
            return
        first, _ = ray.wait(refs, num_returns=1, timeout=timeout_s, fetch_local=False)
        if not first:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        ready = set(ready) | set(first)
        for st in self.pool.process(ready):
            self._on_rollout(st)
        self.publisher.process(ready)
        self.evaluator.process(ready)
        if self.train.busy and all(r in ready for r in self.train.refs()):
            self._on_train_done()

    def settle_weights(self) -> None:
        """Block until every publish in flight ended and every worker finished receiving (resume uses it)."""
        while self.publisher.busy or self.evaluator.busy or self.pool.receiving():
            self._collect(timeout_s=0.5)

    def persisted_state(self) -> dict:
        """What a checkpoint carries of the loop (loop.json `loop_state`): its counters, the publisher's and the
        evaluator's state, as one flat dict."""
        return {
            **dataclasses.asdict(self.s),
            **dataclasses.asdict(self.publisher.s),
            **dataclasses.asdict(self.evaluator.s),
        }

    def restore_state(self, state: dict) -> None:
        """The inverse of `persisted_state` (a decoded loop.json `loop_state`)."""
        self.s, self.publisher.s, self.evaluator.s = (
            cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})
            for cls in (LoopState, PublishState, EvalState)
        )

    def _drain_and_publish_final(self) -> None:
        while self.train.busy or (self.publisher.due and self.pool.publish_must_wait()):
            self._collect(timeout_s=1.0)
        if self.publisher.unpublished(self.s.steps):  # steps since the last publish
            self._publish()
        if self.evaluator.last_version() < self.publisher.version and not self.evaluator.busy:
            self.evaluator.request()
        while self.publisher.busy or self.evaluator.busy or self.pool.busy():
            self._collect(timeout_s=1.0)

    def _finish(self, job_started: float, cold_start_s: float) -> dict:
        rl_wall_s = self.log.now()  # the RL clock ends with the drain: the stop checkpoint and model save are not RL
        self.ckpt.save("stop")
        self.final_dir = self.run_dir / "final_model"
        ray.get([r.save.remote(str(self.final_dir)) for r in self.ranks])
        s, acc = self.s, self.evaluator.summary()
        summary = {
            **{k: acc[k] for k in ("eval_accuracy_initial", "eval_accuracy_final", "eval_accuracy_best")},
            "wall_s": time.perf_counter() - job_started,
            "rl_wall_s": rl_wall_s,
            "cold_start_s": cold_start_s,
            "rl_seconds_to_target": acc["rl_seconds_to_target"],
            "target_gain": acc["target_gain"],
            "learner_steps": s.steps,
            "policy_versions_published": self.publisher.version,
            "traces_consumed": s.traces_consumed,
            "groups_consumed": s.groups_consumed,
            "max_staleness_seen": s.max_staleness_seen,
            "max_staleness_bound": self.cfg.replay.max_staleness,
            "distinct_policy_versions_consumed": len(s.versions_consumed),
            "synchronous": self.cfg.synchronous,
            **self.s.reward_failures,
            # rows (or generated problems) the task source left out, by reason (rollout/tasks.py `skipped_rows`)
            "dataset_skipped_rows": dict(self.pool.task.skipped_rows),
            **self._fault_summary(),
            **self.pool.summary(),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.log.summary(summary)
        draw_report(self.run_dir)
        if self.cfg.reward.kind == "model":
            from services.rlhf_plot import draw_overoptimisation

            draw_overoptimisation(self.run_dir)
        self._progress_close()
        log.info(f"\nrun {self.cfg.run.name!r} finished -> {self.run_dir}\n{format_summary(summary)}")
        return summary

    def _fault_summary(self) -> dict:
        """What the run skipped, resumed and checkpointed, and what replay dropped by policy (whole run)."""
        s, stats = self.s, self.replay.stats()
        return {
            "stopped_by": self.stop_reason
            or (
                "max_learner_steps"
                if s.steps >= self.cfg.run.max_learner_steps
                else "max_wall_s"
                if self.log.now() >= self.cfg.run.max_wall_s
                else "stop_at_gain"
            ),
            "nonfinite_skipped_steps": s.nonfinite_skipped,
            "traces_skipped_nonfinite": s.traces_skipped_nonfinite,
            "resumes": s.resumes,
            "checkpoints_written_this_session": len(self.ckpt.seconds),
            "checkpoint_s_mean": sum(self.ckpt.seconds) / max(1, len(self.ckpt.seconds)),
            "replay_inserted_traces": sum(st.inserted_traces for st in stats),
            "replay_evicted_stale_groups": sum(st.evicted_stale for st in stats),
            "replay_evicted_capacity_groups": sum(st.evicted_capacity for st in stats),
            "replay_groups_held_at_end": sum(st.groups for st in stats),
            # corrupt journal records / segment files a shard skipped on (re)open, copied to <shard>/quarantine/
            "replay_quarantined": sum(st.quarantined for st in stats),
            # groups of draws whose shard died before replying, handed back by the restarted shard
            "replay_reclaimed_groups": sum(st.reclaimed_groups for st in stats),
            # failed draws whose shard stayed down past replay.reclaim_timeout_s (lost, if it had journalled them)
            "replay_unrecovered_draws": self.replay.unrecovered_draws,
            # prefetched samples dropped because the learner's version moved past the prediction (groups lost)
            "prefetch_dropped": self.train.dropped_prefetches,
        }

    def _shutdown(self) -> None:
        """Release engines and groups (vLLM leaks /dev/shm otherwise), then end the actors."""
        self.log.close()
        actors = self.ranks + self.pool.actors()
        refs = [a.shutdown.remote() for a in actors]
        for actor, ref in zip(actors, refs):
            try:
                ray.get(ref, timeout=30)
            except Exception as e:  # an actor that already died has nothing to release
                log.warning(f"shutdown of {actor} failed: {e}")
            ray.kill(actor, no_restart=True)

    # -- terminal -----------------------------------------------------------------------------------
    def _progress_start(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.cfg.run.max_learner_steps,
            desc="RL",
            unit="step",
            disable=not self.cfg.run.progress,
            mininterval=1.0,
        )

    def _progress_update(self, rec: dict) -> None:
        acc = self.evaluator.latest_accuracy()
        self.bar.set_postfix_str(
            f"v={self.publisher.version} reward={rec.get('reward_mean', 0):.2f} eval={acc:.2f} "
            f"stale<={rec['staleness_max']} kl={rec.get('kl_behaviour', 0) or 0:.4f}",
            refresh=False,
        )
        self.bar.update(1)

    def _progress_close(self) -> None:
        self.bar.close()
