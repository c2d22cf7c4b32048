"""`flywheel sweep`: a grid of runs (x seeds) as Ray jobs, at most N at a time, resumable, with one report.

    flywheel sweep --config deploy/configs/tiny_cpu.yaml --name kl-temp \
        --grid learner.objective.kl_behaviour_coef=0,0.01 rollout.temperature=0.7,1.0 --seeds 0,1 \
        [--max-concurrent 2] [--address http://HEAD:8265] [--set run.max_wall_s=300 ...] [--report-only]

Contract:
- The grid is the product of every `--grid KEY=V1,V2,...` axis (values parsed as one YAML flow sequence, so
  `advantage=grpo,{kind: pass_at_k, k: 2}` holds two values) times `--seeds`,
  each seed written to every `--seed-fields` field (default `rollout.seed`: sampling noise, not the task's
  eval split). `--set` overrides apply to every run. Fields that must move together move together
  (`rollout.temperature` also sets `learner.temperature`). Every run's config is validated before anything
  is submitted (exit 2 naming the run and the field).
- Run `<slug>` lives in `<runs-dir>/<name>/<slug>/` with `run.name = <name>/<slug>` (unique per cluster).
- Execution is the Ray Job Submission API: against `--address`, or else a private local head started for
  the sweep (services/ray_head.py), so local and cluster sweeps share one code path and every run is a
  job with its own logs, status and stop. Jobs ship this repo as their working dir; `--runs-dir` must be
  storage the jobs can write and this command can read (a shared mount on a cluster).
- Resumable: `<runs-dir>/<name>/sweep.json` records each run's config fingerprint and job id. A rerun
  skips runs whose summary.json exists for the same fingerprint, waits for recorded jobs still running,
  and resubmits the rest with `run.resume=auto` (a run continues from its latest checkpoint); a run
  whose config changed starts over. Exit codes: 0 every run finished, 1 some failed, 2 bad arguments.
- The report (services/sweep_report.py) is rewritten at the end from every run's files.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from services.config import ConfigError, load_config
from services.sweep_jobs import JobExecutor, Manifest, Scheduler, entrypoint, run_state, runtime_env

LINKED = {"rollout.temperature": ("learner.temperature",)}  # importance ratios need equal temperatures


@dataclasses.dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class SweepRun:
    slug: str
    setting: tuple[tuple[str, Any], ...]  # the grid point, without the seed
    seed: int
    overrides: tuple[str, ...]  # dotted overrides the driver gets (grid, linked, seed, --set, run.*)
    fingerprint: str  # sha256 of the resolved config: a changed base YAML or --set makes a new run

    @property
    def setting_label(self) -> str:
        return ",".join(f"{_short(k, self.setting)}={_label_value(v)}" for k, v in self.setting) or "base"


def format_value(value: Any) -> str:
    """A grid value as YAML writes it inline (the form an override takes: 0.01, true, [1, 2])."""
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("...").strip()
    )


def _label_value(value: Any) -> str:
    """A grid value in a run's name: a variant `{kind: pass_at_k, k: 2}` reads `pass_at_k+k=2`."""
    if isinstance(value, dict) and "kind" in value:
        return "+".join([str(value["kind"])] + [f"{k}={format_value(v)}" for k, v in value.items() if k != "kind"])
    return format_value(value)


def _short(key: str, setting: tuple[tuple[str, Any], ...]) -> str:
    """The key's last part, unless another axis ends the same way."""
    last = key.rsplit(".", 1)[-1]
    return key if sum(k.rsplit(".", 1)[-1] == last for k, _ in setting) > 1 else last


def parse_grid(items: list[str]) -> list[Axis]:
    axes = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise ConfigError(f"--grid {item!r} is not KEY=V1,V2,... (e.g. learner.lr=1e-4,3e-4)")
        try:  # one YAML flow sequence, so a value may hold commas: a list, or a variant {kind: pass_at_k, k: 2}
            values = tuple(yaml.safe_load(f"[{raw}]"))
        except yaml.YAMLError as e:
            raise ConfigError(f"--grid {item!r}: the values are not YAML ({e}); quote the argument") from None
        if any(a.key == key for a in axes):
            raise ConfigError(f"--grid names {key} twice; give all its values in one KEY=V1,V2")
        axes.append(Axis(key, values))
    return axes


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None


def plan_runs(
    config: str, name: str, axes: list[Axis], seeds: list[int], seed_fields: list[str], fixed: list[str]
) -> list[SweepRun]:
    """Every (grid point, seed), validated; raises ConfigError naming the run whose config is invalid."""
    fixed_keys = {f.partition("=")[0] for f in fixed} | {a.key for a in axes}
    runs = []
    for point in itertools.product(*(a.values for a in axes)):
        setting = tuple(zip((a.key for a in axes), point))
        for seed in seeds:
            over = [f"{k}={format_value(v)}" for k, v in setting]
            over += [
                f"{linked}={format_value(v)}"
                for k, v in setting
                for linked in LINKED.get(k, ())
                if linked not in fixed_keys
            ]
            over += [f"{field}={seed}" for field in seed_fields] + list(fixed)
            run = SweepRun("", setting, seed, tuple(over), "")
            slug = re.sub(r"[^A-Za-z0-9._=,+-]", "-", f"{run.setting_label},seed={seed}".removeprefix("base,"))
            try:
                cfg = load_config(config, over)
            except ConfigError as e:
                raise ConfigError(f"sweep run {slug}: {e}") from None
            digest = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
            runs.append(dataclasses.replace(run, slug=slug, fingerprint=digest[:16]))
    return runs


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", required=True, help="base run config (YAML) every run starts from")
    ap.add_argument("--name", required=True, help="sweep name: outputs go to <runs-dir>/<name>/")
    ap.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2", help="one axis per argument")
    ap.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds (default 0)")
    ap.add_argument(
        "--seed-fields", default="rollout.seed", help="config fields each seed is written to (comma-separated)"
    )
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides applied to every run")
    ap.add_argument("--max-concurrent", type=int, default=1, help="runs at a time (default 1)")
    ap.add_argument("--address", default=None, help="Ray dashboard address (default: start a private local head)")
    ap.add_argument("--runs-dir", default="runs", help="where runs and the report go (shared storage on a cluster)")
    ap.add_argument("--poll-s", type=float, default=5.0, help="seconds between job status polls")
    ap.add_argument(
        "--report-only", action="store_true", help="rebuild the report from the runs on disk, submit nothing"
    )


def main(args: argparse.Namespace) -> int:
    import contextlib

    from services.ray_head import local_head
    from services.sweep_report import write_report

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.max_concurrent < 1 or "/" in args.name or not args.name:
        print("error: --max-concurrent must be >= 1 and --name a non-empty name without '/'", file=sys.stderr)
        return 2
    try:
        axes = parse_grid(args.grid)
        seed_fields = [f for f in args.seed_fields.split(",") if f]
        runs = plan_runs(args.config, args.name, axes, args.seeds, seed_fields, list(args.set))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sweep_dir = Path(args.runs_dir) / args.name
    header = {"name": args.name, "config": args.config, "grid": [[a.key, list(a.values)] for a in axes]}
    header |= {"seeds": args.seeds, "seed_fields": seed_fields, "set": list(args.set), "address": args.address}
    manifest = Manifest(sweep_dir / "sweep.json", header)
    if args.report_only:
        print(write_report(sweep_dir, runs))
        return 0
    states = {r.slug: run_state(r, sweep_dir / r.slug, manifest) for r in runs}
    for r in runs:
        rec = manifest.runs.setdefault(r.slug, {})
        rec |= {"setting": dict(r.setting), "seed": r.seed, "fingerprint": r.fingerprint, "state": states[r.slug]}
    manifest.save()
    counts = {s: sum(v == s for v in states.values()) for s in ("finished", "unfinished", "changed", "new")}
    print(f"[sweep] {args.name}: {len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    extra = [] if args.address else [f"run.cache_dir={_cache_dir(args.config, args.set)}"]
    todo = [
        (r, entrypoint(r, args.config, args.name, Path(args.runs_dir), states[r.slug], extra))
        for r in runs
        if states[r.slug] != "finished"
    ]
    final = {}
    if todo:
        logging.getLogger("ray").setLevel(logging.WARNING)  # one INFO line per file Ray skips when packaging
        logs_dir = sweep_dir / "logs"
        logs_dir.mkdir(parents=True, exist_ok=True)
        cpus = max(_run_cpus(args.config, r.overrides) for r, _ in todo) * args.max_concurrent
        head = contextlib.nullcontext(args.address) if args.address else local_head(max(cpus, _cpu_count()))
        with head as address:
            executor = JobExecutor(address)
            final = Scheduler(executor, manifest, args, runtime_env(args.address is None), logs_dir).run(todo)
    print(f"[sweep] report: {write_report(sweep_dir, runs)}")
    failed = sorted(s for s, st in final.items() if st != "SUCCEEDED")
    if failed:
        print(f"[sweep] {len(failed)} run(s) did not succeed: {failed}; logs in {sweep_dir / 'logs'}; rerun to retry")
    return 1 if failed else 0


def _cache_dir(config: str, fixed: list[str]) -> Path:
    """The model/cold-start cache a local driver would use, as an absolute path (jobs run elsewhere)."""
    return Path(load_config(config, fixed).run.cache_dir).resolve()


def _run_cpus(config: str, overrides: tuple[str, ...]) -> float:
    from services.placement import plan

    return sum(s.num_cpus for s in plan(load_config(config, overrides)))


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1
