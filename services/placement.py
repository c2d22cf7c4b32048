"""Where every actor goes and what it asks for: the plan (`plan`, printed by `--dry-run`) and the start-up.

Contract: `plan(cfg)` is pure (no Ray) and lists exactly the actors `start_actors` creates, with the
same resource requests, so a dry run shows what a real run will ask the cluster for.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from services.config import REPO_ROOT, RunConfig


@dataclasses.dataclass(frozen=True)
class ActorSpec:
    role: str
    index: int
    num_cpus: float
    num_gpus: float
    detail: str
    resources: tuple[tuple[str, float], ...] = ()


def plan(cfg: RunConfig) -> list[ActorSpec]:
    specs = [
        ActorSpec("replay_shard", i, 0.0, 0.0, f"sampler={cfg.replay.sampler} max_staleness={cfg.replay.max_staleness}")
        for i in range(cfg.replay.num_shards)
    ]
    lc = cfg.learner
    specs += [
        ActorSpec(
            "learner_rank",
            r,
            lc.num_cpus_per_rank,
            lc.num_gpus_per_rank,
            f"deepspeed zero-{lc.zero_stage} {lc.dist_backend} {lc.groups_per_step // lc.num_ranks} groups/step",
            tuple(lc.ray_resources.items()),
        )
        for r in range(lc.num_ranks)
    ]
    rc = cfg.rollout
    specs += [
        ActorSpec(
            "rollout_worker",
            w,
            rc.num_cpus_per_worker,
            rc.num_gpus_per_worker,
            f"{rc.engine} on {rc.device}, G={rc.group_size}, {rc.prompts_per_step} prompts/call",
            tuple(rc.ray_resources.items()),
        )
        for w in range(rc.num_workers)
    ]
    if cfg.run.eval_worker == "dedicated":  # the last worker id: rollout workers keep ids (and seeds) 0..n-1
        specs.append(
            ActorSpec(
                "eval_worker",
                rc.num_workers,
                rc.num_cpus_per_worker,
                rc.num_gpus_per_worker,
                f"{rc.engine} on {rc.device}, evaluates rank 0's published snapshot every run.eval_every_steps",
                tuple(rc.ray_resources.items()),
            )
        )
    rm = cfg.reward.model
    if rm is not None and rm.placement == "actor":
        specs += [
            ActorSpec(
                "reward_model", i, rm.num_cpus_per_actor, rm.num_gpus_per_actor, f"{rm.path} batch={rm.batch_size}"
            )
            for i in range(rm.num_actors)
        ]
    return specs


def format_plan(cfg: RunConfig, specs: list[ActorSpec]) -> str:
    lines = [
        f"run {cfg.run.name!r}: model={cfg.model.path or 'built-in ' + cfg.model.builtin}, "
        f"task={cfg.task.kind}, render={cfg.render.mode}, "
        f"weight sync={cfg.learner.weight_sync.backend} every {cfg.learner.weight_sync.sync_every_steps} step(s), "
        f"mode={'synchronous' if cfg.synchronous else f'asynchronous (max_staleness={cfg.replay.max_staleness})'}",
        f"{'actor':<16}{'#':>3}{'CPU':>6}{'GPU':>6}  detail",
    ]
    lines += [
        f"{s.role:<16}{s.index:>3}{s.num_cpus:>6g}{s.num_gpus:>6g}  {s.detail}"
        + "".join(f" {k}={v:g}" for k, v in s.resources)
        for s in specs
    ]
    lines.append(f"{'total':<19}{sum(s.num_cpus for s in specs):>6g}{sum(s.num_gpus for s in specs):>6g}")
    return "\n".join(lines)


def actor_env(cfg: RunConfig, cache_dir: Path) -> dict[str, str]:
    """Environment every actor gets: the repo on the path, vLLM in-process, DeepSpeed's op cache, and the
    run's secret (services/auth.py), which the weight-sync rendezvous requires."""
    from services.auth import RUN_SECRET_ENV, read_run_secret

    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": f"{max(1, round(cfg.rollout.kv_cache_gib))}",
        "TORCH_EXTENSIONS_DIR": str(cache_dir / "torch_extensions"),
        "DS_ACCELERATOR": "cuda" if cfg.learner.device == "cuda" else "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        RUN_SECRET_ENV: read_run_secret().decode(),
    }
    return env


def start_rollout_worker(cfg: RunConfig, model_dir: Path, cache_dir: Path, worker_id: int, replay):
    """One `RolloutWorker` actor with the run's resource spec (at start-up and when the pool adds one)."""
    from services.rollout_worker import RolloutWorker

    rc = cfg.rollout
    return RolloutWorker.options(
        num_cpus=rc.num_cpus_per_worker,
        num_gpus=rc.num_gpus_per_worker,
        resources=dict(rc.ray_resources),
        runtime_env={"env_vars": actor_env(cfg, cache_dir)},
    ).remote(rc, cfg.task, cfg.reward, cfg.render, str(model_dir), worker_id, replay)


def start_actors(cfg: RunConfig, model_dir: Path, cache_dir: Path, on_death=None):
    """Create replay, the DeepSpeed group, the reward-model actors (reward.kind=model, placement=actor) and the
    rollout workers, and wire the weight group.

    Returns (replay_client, learner_ranks, rollout_workers), the dedicated eval worker (`run.eval_worker`)
    last among the workers. Blocks until every actor is ready. A rollout worker that dies meanwhile is
    replaced under the same id (services/startup.py); `on_death(StartupDeath)` is told of each.
    """
    import ray

    from services.learner_rank import LearnerRank
    from services.replay_client import create_replay

    env = {"env_vars": actor_env(cfg, cache_dir)}
    replay = create_replay(cfg.replay)
    lc = cfg.learner
    ranks = [
        LearnerRank.options(
            num_cpus=lc.num_cpus_per_rank,
            num_gpus=lc.num_gpus_per_rank,
            resources=dict(lc.ray_resources),
            runtime_env=env,
        ).remote(lc, str(model_dir), r, lc.num_ranks)
        for r in range(lc.num_ranks)
    ]
    addr, port = ray.get(ranks[0].node_address.remote())
    setups = [rank.setup.remote(addr, port) for rank in ranks]
    rm = cfg.reward.model
    if rm is not None and rm.placement == "actor":
        from services.reward_model_actor import start_reward_model_actors

        start_reward_model_actors(rm, cfg.render, env)

    workers = _start_rollout_workers(cfg, model_dir, cache_dir, replay, ranks[0], addr, setups, on_death)
    return replay, ranks, workers


def _start_rollout_workers(cfg: RunConfig, model_dir: Path, cache_dir: Path, replay, rank0, addr, setups, on_death):
    """The rollout workers (engines built, in the start-up weight group with `rank0`) and the dedicated eval
    worker, replacing those that die on the way (services/startup.py); waits for the learner `setups` too."""
    import ray

    from services import faults
    from services.startup import ReplacementBudget, form_group, settle

    lc = cfg.learner

    def restart(wid: int):
        return start_rollout_worker(cfg, model_dir, cache_dir, wid, replay)

    budget, kill, pids = ReplacementBudget(cfg.run.max_worker_replacements), faults.startup_hook(), {}

    def probe(ws: dict) -> dict[int, str]:
        return _probe(ws, pids)

    def attempt(ws: dict):
        kill("start", pids)
        return _rendezvous(rank0, ws, lc.weight_sync, addr, lambda: kill("start_join", pids))

    workers = {w: restart(w) for w in range(cfg.rollout.num_workers)}
    ray.get(setups)
    # Engines built first: the rendezvous below gives members weight_sync.timeout_s to arrive, which a
    # worker still loading its model on a busy node would spend before it even calls join.
    settle(workers, probe, restart, budget)
    form_group(workers, attempt, restart, probe, budget)
    if cfg.run.eval_worker == "dedicated":  # outside the weight group (services/membership.py: roles)
        workers[len(workers)] = restart(len(workers))
        settle(workers, probe, restart, budget)
    for death in budget.deaths:
        if on_death is not None:
            on_death(death)
    return [workers[w] for w in sorted(workers)]


def _failures(refs: dict) -> dict:
    """Wait for every ref (ref -> worker id); worker id -> the exception of those that failed."""
    import ray

    ray.wait(list(refs), num_returns=len(refs))
    failed = {}
    for ref, wid in refs.items():
        try:
            ray.get(ref)
        except Exception as e:  # noqa: BLE001 -- sorted by the caller: death or another failure
            failed[wid] = e
    return failed


def _probe(workers: dict, pids: dict[int, int]) -> dict[int, str]:
    """Worker id -> cause, for the workers whose actor died (constructor crash, kill, node lost); the live
    ones' process ids go into `pids`."""
    import ray

    refs = {w.pid.remote(): wid for wid, w in workers.items()}
    failed = _failures(refs)
    pids.update((wid, ray.get(ref)) for ref, wid in refs.items() if wid not in failed)
    dead = {wid: _brief(e) for wid, e in failed.items() if isinstance(e, ray.exceptions.RayActorError)}
    if len(dead) < len(failed):  # pid() cannot fail in a live actor
        raise next(e for wid, e in failed.items() if wid not in dead)
    return dead


def _rendezvous(rank0, workers: dict, ws, addr: str, queued):
    """One attempt at the start-up weight group: rank 0 plus every worker, on a fresh port (`queued()`
    runs once every join is queued: the fault hook's moment)."""
    import ray

    from services.startup import Rendezvous

    ray.get(rank0.abandon_weight_group.remote())  # a previous attempt's group, if rank 0 had formed it
    port = ws.master_port or ray.get(rank0.node_address.remote())[1]
    world = 1 + len(workers)
    refs = {rank0.join_weight_group.remote(ws, addr, port, world): None}
    for i, wid in enumerate(sorted(workers), start=1):
        refs[workers[wid].join_weight_group.remote(ws, addr, port, i, world)] = wid
    queued()
    failed = _failures(refs)
    dead = {wid: _brief(e) for wid, e in failed.items() if isinstance(e, ray.exceptions.RayActorError)}
    others = [e for wid, e in failed.items() if wid not in dead]
    return Rendezvous(dead, others[0] if others else None)


def _brief(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]
