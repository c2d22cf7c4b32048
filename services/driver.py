"""The Ray job entrypoint: config -> model + cold start -> actors -> the actor-learner loop -> outputs.

    python -m services.driver --config deploy/configs/tiny_cpu.yaml [section.field=value ...] [--dry-run]
    python -m services.driver --config X --resume runs/<name>      (or run.resume=auto)

The loop keeps every rollout worker busy (up to `run.max_buffered_steps` learner steps of groups
ahead; with `replay.max_staleness: 0` only at the learner's current version, i.e. synchronous), lets
the learner sample whole groups from replay whenever it is idle, and after every
`learner.weight_sync.sync_every_steps` steps publishes a new `policy_version` to every worker.
Outputs go to `runs/<run.name>/` (see services/report.py); checkpoints to `runs/<name>/checkpoints/`
and, unless `replay.segment_dir` is set, replay's durable segments to `runs/<name>/replay/` (see
services/checkpoint.py). A fresh run (no resume) clears that run directory's metrics, checkpoints and
replay segments. Exit code 2 = invalid config (or a resume that does not match its checkpoint),
3 = stopped after `learner.max_consecutive_nonfinite` NaN/inf steps (a checkpoint was written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

# Before torch loads (OpenMP reads it once): idle OpenMP threads sleep instead of spinning. On a shared box
# the cold start's spinning threads fought other processes for the cores: 20 SFT steps took 0.1-2.2 s each
# with the default policy, 0.12-0.15 s passive (2 threads, load 2-4).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rollout.datasets import DatasetError  # noqa: E402
from services.checkpoint import ResumePoint, check_resumable, find_resume, rewind_replay  # noqa: E402
from services.config import (  # noqa: E402
    REPO_ROOT,
    ConfigError,
    RunConfig,
    check_model_path,
    load_config,
    write_resolved,
)
from services.placement import format_plan, plan  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m services.driver", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML run config (deploy/configs/*.yaml); omitted = built-in defaults")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, print the actor placement, load the tokenizer, render one train and one eval "
        "prompt, show the stop tokens and the verifier's verdict on the reference answers; start nothing",
    )
    ap.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR (runs/<name>) from its latest checkpoint",
    )
    ap.add_argument(
        "--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray started here)"
    )
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=3e-4 run.name=try2")
    args, unknown = ap.parse_known_args(argv)
    args.overrides += [u for u in unknown if u.startswith("--") and "=" in u]
    bad = [u for u in unknown if not (u.startswith("--") and "=" in u)]
    if bad:
        ap.error(f"unrecognised arguments {bad}; overrides look like section.field=value")
    return args


def cold_start_dir(cfg: RunConfig, base: Path, cache_dir: Path) -> Path:
    """Where `prepare_model` keeps the cold start of `base` for `cfg` (one directory per task, render and
    cold-start settings; tests/bench/cold_start_curve.py --save writes its final model there too)."""
    key = hashlib.sha256(
        f"{base.resolve()}|{cfg.task.model_dump_json(exclude={'step_reward'})}|{cfg.render.model_dump_json()}|"
        f"{cfg.cold_start.model_dump_json()}".encode()
    ).hexdigest()[:16]
    return cache_dir / "models" / f"coldstart-{key}"


def prepare_model(cfg: RunConfig, cache_dir: Path) -> tuple[Path, float]:
    """The policy's starting point (version 0): the given or built-in model, checked by `preflight`, after
    the cold start. Cached. Raises ConfigError / DatasetError before any training when the setup is wrong."""
    from learner.sft import cold_start
    from rollout.render import Renderer
    from rollout.tasks import make_task
    from services.preflight import build_base_model, preflight

    base = build_base_model(cfg, cache_dir)
    preflight(cfg, base)
    if cfg.cold_start is None:
        return base, 0.0
    task = make_task(cfg.task, Renderer.from_pretrained(cfg.render, base))
    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(
        total=cfg.cold_start.steps, desc="cold start (SFT)", unit="step", disable=not cfg.run.progress, mininterval=1.0
    ) as bar:

        def on_step(step: int, loss: float) -> None:
            bar.set_postfix_str(f"loss={loss:.3f}", refresh=False)
            bar.update(1)

        out = cold_start(
            base,
            cold_start_dir(cfg, base, cache_dir),
            task,
            cfg.cold_start,
            render=cfg.render,
            threads=os.cpu_count(),
            on_step=on_step,
        )
    return out, time.perf_counter() - t0


def dry_run(cfg: RunConfig) -> int:
    """Print the placement and the preflight report (tokenizer, prompts, stop tokens, verifier verdicts)."""
    from services.preflight import build_base_model, preflight

    print(format_plan(cfg, plan(cfg)))
    try:
        check_model_path(cfg)
    except ConfigError as e:  # a cluster config names paths on the cluster's nodes
        print(f"note (checked again at start-up on the cluster): {e}")
        return 0
    base = build_base_model(cfg, Path(cfg.run.cache_dir).resolve())
    print(preflight(cfg, base).format())
    return 0


def start_ray(cfg: RunConfig, address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        extra = {} if cfg.run.metrics_port is None else {"_metrics_export_port": cfg.run.metrics_port}
        ray.init(
            address="local",
            num_cpus=cfg.run.num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
            **extra,
        )


def with_replay_dir(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """Replay is durable by default (segments under the run), so a dead shard or a resume loses no trace."""
    if cfg.replay.segment_dir is not None:
        return cfg
    replay = cfg.replay.model_copy(update={"segment_dir": str((run_dir / "replay").resolve())})
    return cfg.model_copy(update={"replay": replay})


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume_dir: str | None) -> tuple[RunConfig, ResumePoint | None]:
    """Resolve the resume point (validated against this config), or clear a previous run's outputs."""
    cfg = with_replay_dir(cfg, run_dir)
    point = find_resume(cfg, run_dir, explicit=resume_dir is not None)
    if point is not None:
        check_resumable(point.state["config"], cfg)
        print(
            f"resuming {run_dir} from {point.path.name} (learner step {point.learner_step}, policy_version "
            f"{point.state['policy_version']})"
        )
        return cfg, point
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if Path(cfg.replay.segment_dir) == (run_dir / "replay").resolve():  # only our default location
        shutil.rmtree(run_dir / "replay", ignore_errors=True)
    return cfg, None


def _new_session_secret(run_dir: Path) -> None:
    """A fresh secret for this session (services/auth.py): in our env for the actors we start, and in
    the run directory for `flywheel scale`. A resumed run gets a new one: all its actors are new too."""
    from services.auth import RUN_SECRET_ENV, new_run_secret, write_secret_file

    secret = new_run_secret()
    os.environ[RUN_SECRET_ENV] = secret
    write_secret_file(run_dir, secret)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg)
        check_model_path(cfg)
        run_dir = Path(args.resume) if args.resume else Path(cfg.run.runs_dir) / cfg.run.name
        cfg, resume = prepare_run_dir(cfg, run_dir, args.resume)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from services.loop import ActorLearnerLoop
    from services.startup import StartupFailed

    cache_dir = Path(cfg.run.cache_dir).resolve()
    write_resolved(cfg, run_dir)
    _new_session_secret(run_dir)
    if resume is not None:
        rewind_replay(resume)  # before the shards start: they restore from their segments
    t0 = time.perf_counter()
    try:
        model_dir, cold_start_s = prepare_model(cfg, cache_dir)
    except (ConfigError, DatasetError) as e:  # bad setup (preflight, rows, solutions): nothing started
        print(f"error: {e}", file=sys.stderr)
        return 2
    start_ray(cfg, args.address)
    import ray

    try:
        loop = ActorLearnerLoop(cfg, run_dir, model_dir, cache_dir, resume=resume)
        summary = loop.run(job_started=t0, cold_start_s=cold_start_s)
    except StartupFailed as e:  # rollout workers kept dying before the loop began: say which and why
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    print(json.dumps(summary, indent=1))
    if summary["stopped_by"] == "nonfinite":
        print(
            f"error: run stopped: {summary['nonfinite_skipped_steps']} learner step(s) skipped for NaN/inf loss or "
            f"gradient, the last {cfg.learner.max_consecutive_nonfinite} in a row; see kind=nonfinite_step in "
            f"{run_dir / 'metrics.jsonl'}, fix the data or lower learner.lr, then resume with --resume {run_dir}",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
