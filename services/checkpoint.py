"""Run checkpoints and resume: `runs/<name>/checkpoints/`, written atomically, the last K kept.

Layout and the commit protocol: services/checkpoint_store.py. A checkpoint directory holds
    loop.json                   learner_step, policy_version, the loop's counters (summary continuity),
                                each prompt stream's cursor, one replay snapshot per shard, the driver's
                                RNG, the RL clock and the resolved config
    deepspeed/state/...         DeepSpeed `save_checkpoint` of every rank (model, optimiser, scheduler;
                                each rank writes its own ZeRO partitions, nothing is gathered)
    rank-<r>.pt                 learner rank r's RNG state and step count
Invariant: at every instant `latest` names a complete, synced checkpoint (or does not exist yet), so a
crash at any point of a save, a re-save of the same step included, resumes from a complete one.
Checkpoints are taken right after a publish, so the learner's weights are exactly those of `policy_version`.

Resume protocol (`Checkpointer.restore`, before the loop dispatches anything): the driver has already
rewound the replay segments to the checkpoint's snapshots (`rewind_replay`), so replay holds the
groups that were in it at the checkpoint plus every group acknowledged after it; each learner rank
loads its DeepSpeed state and RNG; the loop state and RL clock continue; each prompt stream skips
what it had given out by the checkpoint (loop.json) and, past that, every prompt whose traces reached
replay (`replay_cursors`, from the origin stamped in trace metadata, those that went in while the
checkpoint was taken included; nothing is read from metrics.jsonl), so a prompt is trained on once or
re-drawn, never both; a call only part of whose prompts reached replay is re-issued (`unfinished_calls`);
workers receive the checkpoint's weights as `policy_version` before any rollout. Learner steps after the
checkpoint are redone (their samples were rolled back with the replay); groups sampled by the policies those
steps made (versions above the checkpoint's) are evicted as stale (`evicted_newer_groups` in the resume
record), since the redone steps give those version numbers to different weights.
Requires `run_dir` on storage every learner rank can write (one machine, or a shared filesystem).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.checkpoint_store import (
    LATEST,
    CheckpointStore,
    ResumePoint,
    replay_cursors,
    sync_tree,
    unfinished_calls,
)
from services.config import ConfigError, RunConfig

__all__ = ["CheckpointStore", "Checkpointer", "ResumePoint", "check_resumable", "find_resume", "sync_tree"]

# Fields a resumed run may change: budgets, cadence, placement and resources. Everything else (model,
# task, group size, learner world, replay layout, ...) shapes the state and must match.
RESUME_MAY_DIFFER = (
    "run.name",
    "run.runs_dir",
    "run.cache_dir",
    "run.max_learner_steps",
    "run.max_wall_s",
    "run.eval_every_steps",
    "run.stop_at_gain",
    "run.checkpoint_every_steps",
    "run.keep_checkpoints",
    "run.resume",
    "run.num_cpus",
    "run.metrics_port",
    "run.progress",
    "run.max_buffered_steps",
    "learner.max_consecutive_nonfinite",
    "learner.num_cpus_per_rank",
    "learner.ray_resources",
    "rollout.num_workers",
    "rollout.num_cpus_per_worker",
    "rollout.ray_resources",
    "replay.insert_timeout_s",
    "replay.insert_retry_s",
)


def find_resume(cfg: RunConfig, run_dir: Path, explicit: bool) -> ResumePoint | None:
    """The checkpoint to continue from: required with `--resume`, optional with `run.resume: auto`."""
    if not explicit and cfg.run.resume == "never":
        return None
    point = CheckpointStore(run_dir, cfg.run.keep_checkpoints).latest()
    if point is None and explicit:
        raise ConfigError(
            f"--resume {run_dir}: no checkpoint there ({run_dir / 'checkpoints' / LATEST} is missing); "
            "give the directory of a run that wrote checkpoints (run.checkpoint_every_steps)"
        )
    return point


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in RESUME_MAY_DIFFER:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resumable(saved_config: dict, cfg: RunConfig) -> None:
    """Raise `ConfigError` naming every field that differs from the checkpoint's config and may not."""
    old, new = _flatten(saved_config), _flatten(cfg.model_dump(mode="json"))
    diffs = [k for k in sorted(set(old) | set(new)) if k not in RESUME_MAY_DIFFER and old.get(k) != new.get(k)]
    if diffs:
        lines = "\n".join(f"  {k}: checkpoint has {old.get(k)!r}, this run has {new.get(k)!r}" for k in diffs)
        raise ConfigError(
            f"cannot resume: the config differs from the checkpoint's in field(s) that shape the "
            f"saved state:\n{lines}\nresume with the checkpoint's values (see its config in loop.json) "
            "or start a new run under another run.name"
        )


def rewind_replay(point: ResumePoint) -> None:
    """Make each shard's snapshot taken with the checkpoint its newest (before the shards start)."""
    from replay.segments import rewind, snapshot_index

    tag = f"{point.path.name}-{time.time_ns()}"
    for snap in point.state["replay_snapshots"]:
        rewind(Path(snap).parent, snapshot_index(snap), tag)


# ---- the loop state as JSON -------------------------------------------------------------------------
def encode(obj: Any) -> Any:
    """JSON-safe form of the loop's counters: sets and int-keyed dicts survive the round trip."""
    if isinstance(obj, set):
        return {"__set__": sorted(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {"__items__": [[k, encode(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [encode(x) for x in obj]
    return obj


def decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__set__"}:
            return set(obj["__set__"])
        if set(obj) == {"__items__"}:
            return {k: decode(v) for k, v in obj["__items__"]}
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(x) for x in obj]
    return obj


def driver_rng() -> dict:
    """The driver's python and numpy RNG state, as JSON (learner ranks save their own, with torch's)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}


def restore_driver_rng(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, g))


# ---- the loop's side: save and restore through the actors -------------------------------------------
class Checkpointer:
    """Saves and restores an `ActorLearnerLoop` (its ranks, workers, replay and counters)."""

    def __init__(self, loop, resume: ResumePoint | None):
        self.loop, self.resume = loop, resume
        self.store = CheckpointStore(loop.run_dir, loop.cfg.run.keep_checkpoints, loop.cfg.replay.prune_traces)
        self.last_step = resume.learner_step if resume is not None else 0
        self.seconds: list[float] = []

    def due(self) -> bool:
        return self.due_at(self.loop.s.steps)

    def due_at(self, learner_step: int) -> bool:
        """Would a publish at `learner_step` take a periodic checkpoint?"""
        every = self.loop.cfg.run.checkpoint_every_steps
        return bool(every) and learner_step - self.last_step >= every

    def save(self, reason: str) -> Path:
        """Checkpoint now: call with no learner step in flight, right after a publish."""
        import ray

        loop, t0 = self.loop, time.perf_counter()
        tmp = self.store.begin(loop.s.steps)
        rank_s = max(ray.get([rank.save_state.remote(str(tmp)) for rank in loop.ranks]))
        t_replay = time.perf_counter()
        snapshots = _replay_snapshots(loop.replay)
        replay_s = time.perf_counter() - t_replay
        state = {
            "learner_step": loop.s.steps,
            "policy_version": loop.publisher.version,
            "reason": reason,
            "rl_clock_s": loop.log.now(),
            "initial_accuracy": loop.evaluator.initial_accuracy,
            "loop_state": encode(loop.persisted_state()),
            "replay_snapshots": snapshots,
            "driver_rng": driver_rng(),
            "config": loop.cfg.model_dump(mode="json"),
            "written_at": time.time(),
        }
        path = self.store.commit(tmp, state)
        self.last_step = loop.s.steps
        self.seconds.append(time.perf_counter() - t0)
        loop.log.write(
            "checkpoint",
            learner_step=loop.s.steps,
            policy_version=loop.publisher.version,
            reason=reason,
            path=str(path),
            seconds=self.seconds[-1],
            rank_save_s=rank_s,
            replay_snapshot_s=replay_s,
        )
        return path

    def restore(self) -> None:
        """Bring the freshly started actors and the loop to the checkpoint (see the module docstring)."""
        import ray

        loop, point = self.loop, self.resume
        steps = ray.get([rank.load_state.remote(str(point.path)) for rank in loop.ranks])
        if set(steps) != {point.learner_step}:
            raise RuntimeError(
                f"{point.path}: learner ranks restored steps {steps}, loop.json says {point.learner_step}"
            )
        loop.restore_state(decode(point.state["loop_state"]))
        loop.evaluator.initial_accuracy = point.state["initial_accuracy"]
        loop.log.continue_clock(point.state["rl_clock_s"])
        restore_driver_rng(point.state["driver_rng"])
        self._restore_cursors()
        version = loop.publisher.version
        orphaned = loop.replay.evict_newer(version)  # sampled by the policies after the checkpoint, now discarded
        loop.broadcast(version)  # the checkpoint's weights, as its version, over a freshly formed group
        loop.settle_weights()
        got = ray.get([h.policy_version.remote() for h in loop.pool.handles.values()])
        loop.log.write(
            "resume",
            learner_step=loop.s.steps,
            policy_version=version,
            checkpoint=str(point.path),
            workers_at_version=got,
            evicted_newer_groups=orphaned,
        )

    def _restore_cursors(self) -> None:
        loop = self.loop
        cursors = {int(k): tuple(v) for k, v in loop.s.cursors.items()}  # at the checkpoint (loop.json)
        drawn, batches = replay_cursors(self.resume.state["replay_snapshots"])  # reached replay
        for i in {*drawn, *batches}:
            cur = cursors.get(i, (0, 0))
            cursors[i] = (max(cur[0], drawn.get(i, 0)), max(cur[1], batches.get(i, 0)))
        loop.s.cursors = cursors
        loop.pool.restore_cursors(cursors)
        snapshots, per_call = self.resume.state["replay_snapshots"], loop.cfg.rollout.prompts_per_step
        loop.pool.requeue(unfinished_calls(snapshots, per_call), per_call)


def _replay_snapshots(replay, timeout_s: float = 60.0) -> list[str]:
    """One snapshot path per shard; a shard that is restarting is waited for (it recovers from its segments)."""
    deadline = time.monotonic() + timeout_s
    while True:
        snaps = replay.checkpoint()
        down = [k for k, s in enumerate(snaps) if not isinstance(s, str)]
        if not down:
            return snaps
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"replay shard(s) {down} stayed down for {timeout_s:.0f} s; cannot checkpoint replay: {snaps[down[0]]}"
            )
        time.sleep(0.5)
