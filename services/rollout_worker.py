"""`RolloutWorker`: a Ray actor that samples scored groups with a live engine and pushes them to replay.

Thin by design: generation is `rollout.sampling.sample_group_batch` over a `rollout.engine.Engine`,
scoring is the task's verifier, and the scored completions go to replay as one `TRACE_SCHEMA` Arrow batch
built from flat column buffers (rollout/scored_batch.py), never a `replay.schema.Trace` per completion.
The actor is sequential, so a weight update queued behind a rollout call is applied between batches
("drain" semantics): every trace of a batch comes from one `policy_version`.

Membership (services/worker_pool.py): the loop may hand a call its exact `problems` (so a dead
worker's prompts can be re-issued elsewhere) and may move the worker to a new weight group inside
`receive_weights(group, rank)`. A receive runs between rollout calls (the actor is sequential) and the
sender starts the broadcast only once every receiver is there, so a long generation delays an update
instead of timing it out. The update streams into the engine bucket by bucket in the wire dtype; if it
fails midway the engine goes back to its starting weights (policy_version 0, so its traces say so and
the pool re-sends the current weights) rather than serving a mix.
With `weight_sync.inflight: pause` a vLLM worker also takes an announced update between engine steps
of a running rollout; the receive queued for that version then returns at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray

from learner.weight_packing import unpack_bucket
from learner.weight_transport import (
    BroadcastTransport,
    WeightGroup,
    WeightSyncConfig,
    WeightSyncError,
    WeightSyncTimeout,
)
from replay.rejections import RejectReason
from replay.table import InsertResult
from rollout.config import RolloutConfig
from rollout.engine import EngineNeedsWeights
from rollout.render import RenderConfig, Renderer
from rollout.rewards import RewardConfig, RewardScorer, ScoreBatchResult, load_reward_function
from rollout.tasks import Problem, TaskConfig, make_task
from services import metrics

log = logging.getLogger(__name__)
_ORIGIN_IDS = uuid.UUID("5f0c4c1e-8a57-4d7a-9a51-6b1f0e3c2d15")  # uuid5 namespace of origin group ids


@dataclasses.dataclass(frozen=True)
class RolloutStats:
    worker_id: int
    policy_version: int
    groups: int
    traces: int
    tokens: int
    reward_mean: float
    accepted_groups: int
    rejected_groups: int
    generate_s: float
    total_s: float
    reward_timeouts: int = 0  # scoring failures in this call (rollout.rewards.RewardScorer)
    reward_errors: int = 0
    reward_nonfinite: int = 0
    dropped_groups: int = 0  # groups dropped because a member's score failed under on_failure=drop
    uniform_groups: int = 0  # groups dropped because all rewards were equal (rollout.drop_uniform_groups)
    batches: int = 0
    sandbox_outcomes: dict = dataclasses.field(default_factory=dict)  # code-reward runs by outcome (rollout/sandbox.py)
    # groups replay already had (a re-issued call whose first worker died after inserting them): not
    # inserted again and not lost, so not counted in rejected_groups
    duplicate_groups: int = 0
    # reward.kind=model: mean verifier (gold) score and raw reward-model (proxy) score of what was sampled
    gold_reward_mean: float | None = None
    model_score_mean: float | None = None
    # seconds this worker spent receiving and loading weights since its previous rollout call (between calls
    # and, in pause mode, inside this one): the weight-sync share of the worker's time
    weights_received_s: float = 0.0


def origin_group_ids(origin: tuple[int, int], num_prompts: int, seed: int) -> list[str]:
    """Group ids of a call's prompts, fixed by their positions in their stream: a re-issued call (its
    first worker died during or after its insert) yields the ids its first attempt may already have put
    into replay, and replay rejects those as duplicates, so each prompt is inserted once."""
    stream, drawn = origin
    return [uuid.uuid5(_ORIGIN_IDS, f"{seed}/{stream}/{p}").hex for p in range(drawn - num_prompts, drawn)]


def origin_stamps(
    group_ids: Sequence[str],
    kept_ids: Sequence[str],
    origin: tuple[int, int],
    worker_id: int,
    batch: int,
    positions: dict,
) -> list[dict]:
    """Each group's "origin" metadata stamp: the call's origin, the prompt's position in the stream (group id ->
    position) and "kept": the positions of every group this insert carries (`kept_ids`: after dropped and
    uniform groups left), so a resume can tell a call whose insert only partly reached replay from one that
    dropped groups."""
    kept = sorted({positions[g] for g in kept_ids})
    call = {"stream": origin[0], "drawn": origin[1], "worker": worker_id, "batch": batch}
    return [{**call, "position": positions[g], "kept": kept} for g in group_ids]


@ray.remote
class RolloutWorker:
    def __init__(
        self,
        cfg: RolloutConfig,
        task_cfg: TaskConfig,
        reward_cfg: RewardConfig,
        render_cfg: RenderConfig,
        model_dir: str,
        worker_id: int,
        replay,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from rollout.engine import make_engine

        self.cfg, self.worker_id, self.replay = cfg, worker_id, replay
        self.renderer = Renderer.from_pretrained(render_cfg, model_dir)
        self.task = make_task(task_cfg, self.renderer)
        self.problems = self.task.train_stream(seed=task_cfg.seed * 1000 + 1 + worker_id)
        self.engine = make_engine(cfg, Path(model_dir), self.renderer.stop)
        # One scoring function for rewards and eval: the user's, else the task's verifier (small, picklable).
        fn = load_reward_function(reward_cfg.function) if reward_cfg.function else self.task.verifier.score
        self.scorer = RewardScorer(fn, reward_cfg)
        self.model_reward = None
        if reward_cfg.kind == "model":
            from rollout.reward_model_scorer import ModelRewardMix
            from services.reward_model_actor import ModelScoreSource

            source = ModelScoreSource(reward_cfg.model, self.renderer, worker_id)
            self.model_reward = ModelRewardMix(reward_cfg.model, source.score)
        self._failures = ScoreBatchResult(rewards=[])
        self.transport = None
        self.batches = 0
        self.needs_weights = False  # an update broke midway: no rollout until a complete one (`_load`)
        self.weights_received_s = 0.0  # since the last rollout call returned (RolloutStats.weights_received_s)
        metrics.record_engine_version(worker_id, self.engine.policy_version)

    def _step_rewards(self):
        """Per-token process rewards of a completion when the task has a step verifier, else None."""
        cfg = getattr(self.task.cfg, "step_reward", None)
        if cfg is None:
            return None
        from rollout.step_rewards import completion_token_rewards

        return lambda problem, ids: completion_token_rewards(cfg, problem, ids, self.renderer.completion_text)

    def _score_batch(self, items):
        result = self.scorer.score_batch(items)
        f = self._failures
        self._failures = ScoreBatchResult(
            rewards=[],
            timeouts=f.timeouts + result.timeouts,
            errors=f.errors + result.errors,
            non_finite=f.non_finite + result.non_finite,
            sandbox={k: f.sandbox.get(k, 0) + result.sandbox.get(k, 0) for k in {*f.sandbox, *result.sandbox}},
        )
        if self.model_reward is None:
            return result.rewards
        return self.model_reward.rewards(items, result.rewards)

    def _model_reward_stats(self) -> dict:
        """Gold/proxy means for the stats, and the reward model's failures folded into the reward counters."""
        if self.model_reward is None:
            return {}
        st = self.model_reward.take_stats()
        f = self._failures
        self._failures = dataclasses.replace(
            f,
            timeouts=f.timeouts + st["model_timeouts"],
            errors=f.errors + st["model_errors"],
            non_finite=f.non_finite + st["model_non_finite"],
        )
        return {"gold_reward_mean": st["gold_reward_mean"], "model_score_mean": st["model_score_mean"]}

    def rollout(
        self, num_prompts: int, problems: list[Problem] | None = None, origin: tuple[int, int] | None = None
    ) -> RolloutStats:
        """Sample `num_prompts` groups at the current weights, score them and insert them into replay.

        `problems` (exactly `num_prompts` of them) replaces the worker's own problem stream for this call
        (the loop's worker pool draws them, so it can re-issue a dead worker's prompts). `origin`
        (stream, problems drawn from it after this call) is stamped, with this worker's batch number and
        the prompt's position in the stream, into every inserted trace's metadata as "origin" (a resume
        reads prompt cursors from replay), and fixes the group ids (`origin_group_ids`)."""
        from rollout.sampling import sample_group_batch

        t0 = time.perf_counter()
        if self.needs_weights:  # the pool re-issues these prompts and re-sends the weights
            raise EngineNeedsWeights(
                f"rollout worker {self.worker_id}: its last weight update broke midway and the engine is back on "
                "the starting weights; it generates again once it receives a complete update"
            )
        if problems is not None and len(problems) != num_prompts:
            raise ValueError(
                f"rollout got {len(problems)} problems for num_prompts={num_prompts}; pass exactly num_prompts"
            )
        problems = list(problems) if problems is not None else [next(self.problems) for _ in range(num_prompts)]
        metrics.rollout_started(self.worker_id, num_prompts * self.cfg.group_size)
        seed = self.cfg.seed * 1_000_003 + self.worker_id * 10_007 + self.batches
        self._failures = ScoreBatchResult(rewards=[])
        ids = origin_group_ids(origin, num_prompts, self.cfg.seed) if origin is not None else None
        sampled = sample_group_batch(
            self.engine,
            problems,
            self.renderer,
            self.task.score,
            self.cfg.group_size,
            seed=seed,
            score_batch=self._score_batch,
            group_ids=ids,
            step_rewards=self._step_rewards(),
        )
        keep = ~sampled.uniform_groups() if self.cfg.drop_uniform_groups else np.ones(sampled.num_groups, dtype=bool)
        t_gen = time.perf_counter()
        self.batches += 1
        stamps = None
        if origin is not None:
            positions = {g: origin[1] - num_prompts + i for i, g in enumerate(ids)}
            kept_ids = [g for g, k in zip(sampled.group_ids, keep) if k]
            stamps = origin_stamps(sampled.group_ids, kept_ids, origin, self.worker_id, self.batches, positions)
        # one Arrow batch from the flat buffers, every row checked; the prompt travels once per group
        batch = sampled.to_arrow(stamps, keep) if sampled.num_traces else None
        result = self.replay.insert(batch) if batch is not None and batch.num_rows else InsertResult(0, 0, ())
        duplicates = sum(r is RejectReason.DUPLICATE for r in result.reasons)
        metrics.record_rollout(
            self.worker_id, self.engine.policy_version, sampled, t_gen - t0, time.perf_counter() - t_gen
        )
        model_stats = self._model_reward_stats()
        if model_stats:
            metrics.record_model_reward(self.worker_id, *model_stats.values())
        weights_received_s, self.weights_received_s = self.weights_received_s, 0.0
        return RolloutStats(  # groups/traces/tokens/reward_mean describe what was sampled and scored
            worker_id=self.worker_id,
            policy_version=self.engine.policy_version,
            groups=sampled.num_groups,
            traces=sampled.num_traces,
            tokens=int(sampled.offsets[-1]),
            reward_mean=sum(sampled.rewards.tolist()) / max(1, sampled.num_traces),
            accepted_groups=result.accepted_groups,
            rejected_groups=len(result.rejected) - duplicates,
            duplicate_groups=duplicates,
            generate_s=t_gen - t0,
            total_s=time.perf_counter() - t0,
            reward_timeouts=self._failures.timeouts,
            reward_errors=self._failures.errors,
            reward_nonfinite=self._failures.non_finite,
            dropped_groups=num_prompts - sampled.num_groups,
            uniform_groups=int((~keep).sum()),
            batches=self.batches,
            sandbox_outcomes=self._failures.sandbox,
            **model_stats,
            weights_received_s=weights_received_s,
        )

    def restore_batches(self, batches: int) -> int:
        """Resume: continue the per-batch sampling seeds (the prompt cursor lives in the loop's pool)."""
        self.batches = batches
        return batches

    def join_weight_group(
        self, cfg: WeightSyncConfig, master_addr: str, master_port: int, rank: int, world_size: int
    ) -> int:
        if self.transport is not None:  # a start-up rendezvous retried after another member died
            self.transport.close()
            self.transport = None
        self.transport = BroadcastTransport.create(cfg, master_addr, master_port, rank, world_size)
        self._set_inflight(cfg)
        return rank

    def _set_inflight(self, cfg: WeightSyncConfig) -> None:
        if cfg.inflight == "pause" and not hasattr(self.engine, "step_hook"):
            raise ValueError(
                f"weight_sync.inflight='pause' needs an engine that runs step by step (vLLM), not {self.cfg.engine!r}"
            )
        if hasattr(self.engine, "step_hook"):
            self.engine.step_hook = self._take_update_inflight if cfg.inflight == "pause" else None

    def _take_update_inflight(self) -> None:
        """Between engine steps (pause mode): load an update that is already announced, else return at once."""
        if self.transport is None or not self.transport.update_waiting():
            return
        t0 = time.perf_counter()
        try:
            version, tensors = self.transport.receive(wait_s=self.transport.cfg.timeout_s)
            self._load(tensors, version)
        except WeightSyncError as e:  # the group broke: generation goes on; the queued receive reports it
            log.warning(f"rollout worker {self.worker_id}: in-flight weight update failed: {e}")
            return
        self.weights_received_s += time.perf_counter() - t0
        metrics.record_weights_received(self.worker_id, time.perf_counter() - t0, version)

    def _load(self, tensors, version: int) -> None:
        """Stream an update into the engine; if it breaks midway, restore the starting weights and re-raise."""
        try:
            self.engine.load_weights(tensors, version)
            self.needs_weights = False
        except BaseException as err:
            self.needs_weights = True
            log.warning(
                f"rollout worker {self.worker_id}: update {version} failed midway ({err}); "
                "reloading the starting weights until the next complete update"
            )
            self.engine.reload_initial_weights()
            metrics.record_engine_version(self.worker_id, self.engine.policy_version)
            if isinstance(err, WeightSyncTimeout):
                metrics.record_sync_timeout()
            raise

    def receive_weights(
        self, group: WeightGroup | None = None, rank: int | None = None, policy_version: int | None = None
    ) -> int:
        """Wait (<= timeout_s) for learner rank 0's next broadcast, load it into the live engine; return its version.

        With `group`, first leave the current weight group and join that one as `rank`. An update
        of the version the engine already holds (a re-formed group's first broadcast) is drained, not reloaded.
        `policy_version`: the version this call is for; if a pause-mode rollout already took it, return at once."""
        if group is None and policy_version is not None and self.engine.policy_version >= policy_version:
            return self.engine.policy_version
        if group is not None:
            if self.transport is not None:
                self.transport.close()
                self.transport = None
            self.transport = BroadcastTransport.create(
                group.cfg, group.master_addr, group.master_port, rank, group.world_size
            )
            self._set_inflight(group.cfg)
        if self.transport is None:
            raise WeightSyncError(
                f"rollout worker {self.worker_id} is in no weight group; pass a WeightGroup (or call join_weight_group)"
            )
        t0 = time.perf_counter()
        version, tensors = self.transport.receive(wait_s=self.transport.cfg.timeout_s)
        if version == self.engine.policy_version:
            for _ in tensors:
                pass
        else:
            self._load(tensors, version)
        self.weights_received_s += time.perf_counter() - t0
        metrics.record_weights_received(self.worker_id, time.perf_counter() - t0, version)
        return version

    def evaluate(self, problems: list[Problem]) -> tuple[int, float]:
        """Greedy pass@1 on `problems` at the current weights: (policy_version, accuracy).

        Scored by the same function as rollout rewards (`reward.function`, else the task's verifier); a
        problem is correct when its score is >= 1, a failed score counts as wrong."""
        from rollout.evaluation import CORRECT

        outs = self.engine.greedy([self.renderer.encode_prompt(p) for p in problems])
        result = self.scorer.score_batch([(p, self.renderer.completion_text(o)) for p, o in zip(problems, outs)])
        correct = sum(r is not None and r >= CORRECT for r in result.rewards)
        accuracy = correct / max(1, len(problems))
        metrics.record_eval(self.engine.policy_version, accuracy)
        return self.engine.policy_version, accuracy

    def evaluate_published(self, published: tuple[int, list] | None, problems: list[Problem]) -> tuple[int, float]:
        """Dedicated eval worker: load learner rank 0's snapshot (`LearnerRank.published_weights`, resolved
        from the object store; None = keep the current weights) unless the engine holds that version, then
        `evaluate`."""
        if published is not None and published[0] != self.engine.policy_version:
            version, buckets = published
            self._load((t for b in buckets for t in unpack_bucket(b.wire, b.header_nbytes)), version)
        return self.evaluate(problems)

    def teacher_forced_logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        return self.engine.teacher_forced_logprobs(prompt_ids, completion_ids)

    def policy_version(self) -> int:
        return self.engine.policy_version

    def pid(self) -> int:
        """The actor's process id (the pool's readiness probe; fault tests kill -9 it)."""
        return os.getpid()

    def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.scorer.close()
        self.engine.shutdown()
