"""How `flywheel sweep` runs its grid: the Ray Job Submission API, a concurrency limit, and `sweep.json`.

Contract:
- `Manifest` is `<runs-dir>/<sweep>/sweep.json`: the sweep's arguments and, per run, its config
  fingerprint, job id, status and attempts; written atomically after every change.
- `run_state` decides what a rerun does with a run: finished (skip), changed (start over), unfinished
  or new (submit with `run.resume=auto`, so a run with a checkpoint continues from it).
- `Scheduler.run` keeps at most `max_concurrent` jobs running, adopts a recorded job still running on
  the cluster instead of submitting it again, and saves each job's logs to `<sweep>/logs/<run>.log`.
- Jobs get this repo as their working dir and deploy/ray/runtime_env.yaml (the README's cluster setup).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from services.config import REPO_ROOT

if TYPE_CHECKING:
    from services.sweep import SweepRun

log = logging.getLogger(__name__)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class Manifest:
    """`sweep.json`: the sweep's arguments and, per run, its fingerprint, job id, status and attempts."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        old = json.loads(path.read_text()) if path.exists() else {}
        self.runs: dict[str, dict] = old.get("runs", {})
        self.header = header

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.header, "runs": self.runs}, indent=1, default=str))
        tmp.replace(self.path)


def run_state(run: SweepRun, run_dir: Path, manifest: Manifest) -> str:
    """finished | changed (its config differs from the recorded one) | unfinished | new."""
    known = manifest.runs.get(run.slug, {})
    same = known.get("fingerprint") in (None, run.fingerprint)
    if (run_dir / "summary.json").exists():
        return "finished" if same else "changed"
    if not same:
        return "changed"
    return "unfinished" if run_dir.exists() or known else "new"


class JobExecutor:
    """The Ray Job Submission API on one head: submit a driver, poll it, fetch its logs."""

    def __init__(self, address: str):
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(address)

    def submit(self, entrypoint: str, runtime_env: dict, job_id: str, agent_wait_s: float = 300.0) -> str:
        """Submit; a head whose job agent is not up yet (it starts after the dashboard) is retried for a while."""
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                return self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id)
            except RuntimeError as e:
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                log.info("the Ray head's job agent is not up yet; retrying the submission")
                time.sleep(3)

    def status(self, job_id: str) -> str | None:
        """PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED, or None for a job this head does not know."""
        try:
            return str(self.client.get_job_status(job_id).value)
        except Exception:  # unknown id (e.g. a previous local head's job): the run is resubmitted
            return None

    def logs(self, job_id: str) -> str:
        try:
            return self.client.get_job_logs(job_id)
        except Exception as e:
            return f"(logs unavailable: {e})"


def runtime_env(local_head: bool) -> dict:
    """Jobs get this repo as their working dir and the README's runtime env (deploy/ray/runtime_env.yaml)."""
    env = yaml.safe_load((REPO_ROOT / "deploy/ray/runtime_env.yaml").read_text())
    env["working_dir"] = str(REPO_ROOT)
    if local_head:  # same machine: the Makefile's settings and caches apply to the jobs too
        env["env_vars"] |= {k: v for k, v in _local_env().items() if v is not None}
    return env


def _local_env() -> dict[str, str | None]:
    import os

    keys = ("VLLM_CPU_KVCACHE_SPACE", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "WANDB_MODE", "WANDB_SILENT")
    return {k: os.environ.get(k) for k in keys}


def entrypoint(run: SweepRun, config: str, name: str, runs_dir: Path, state: str, extra: list[str]) -> str:
    """`python -m services.driver ...` for one run; paths are absolute except a config inside the repo."""
    import shlex

    cfg = Path(config).resolve()
    cfg_arg = str(cfg.relative_to(REPO_ROOT)) if cfg.is_relative_to(REPO_ROOT) else str(cfg)
    resume = "never" if state == "changed" else "auto"
    over = [*run.overrides, f"run.runs_dir={runs_dir.resolve()}", f"run.name={name}/{run.slug}"]
    over += ["run.progress=false", f"run.resume={resume}", f"run.wandb.group={name}", *extra]
    return shlex.join(["python", "-m", "services.driver", "--config", cfg_arg, *over])


def _job_id(sweep_name: str, slug: str) -> str:
    """A fresh submission id (Ray refuses to reuse one): sweep, run, time and a random suffix."""
    suffix = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{sweep_name}-{slug}")[:180] + f"-{suffix}"


class Scheduler:
    """At most `max_concurrent` jobs at a time until every run has ended; `final` maps slug -> job status.

    A job the head stops knowing about (`status` None) counts as LOST after `MISSES` polls in a row, so
    one failed poll (a dashboard hiccup) does not abandon a run that is still going."""

    MISSES = 3

    def __init__(self, executor, manifest: Manifest, args, env: dict, logs_dir: Path):
        self.executor, self.manifest, self.args, self.env, self.logs_dir = executor, manifest, args, env, logs_dir
        self.active: dict[str, str] = {}  # slug -> job id
        self.misses: dict[str, int] = {}
        self.final: dict[str, str] = {}

    def run(self, jobs: list[tuple[SweepRun, str]]) -> dict[str, str]:
        pending = [(r, ep) for r, ep in jobs if not self._adopt(r)]
        while pending or self.active:
            while pending and len(self.active) < self.args.max_concurrent:
                self._submit(*pending.pop(0))
            time.sleep(self.args.poll_s)
            for slug, job_id in list(self.active.items()):
                self._poll(slug, job_id, left=len(pending))
        return self.final

    def _adopt(self, run: SweepRun) -> bool:
        """A job a previous invocation left running on this cluster is waited for, not submitted again."""
        job_id = self.manifest.runs.get(run.slug, {}).get("job_id")
        if job_id and self.executor.status(job_id) in ("PENDING", "RUNNING"):
            log.info(f"[sweep] {run.slug}: job {job_id} is still running, waiting for it")
            self.active[run.slug] = job_id
            return True
        return False

    def _submit(self, run: SweepRun, entrypoint: str) -> None:
        job_id = _job_id(self.args.name, run.slug)
        self.executor.submit(entrypoint, self.env, job_id)
        rec = self.manifest.runs.setdefault(run.slug, {})
        rec |= {"job_id": job_id, "status": "SUBMITTED", "attempts": rec.get("attempts", 0) + 1}
        rec["submitted_at"] = time.time()
        self.manifest.save()
        self.active[run.slug] = job_id
        log.info(f"[sweep] submitted {run.slug} as job {job_id} ({len(self.active)} running)")

    def _poll(self, slug: str, job_id: str, left: int) -> None:
        status = self.executor.status(job_id)
        self.misses[slug] = self.misses.get(slug, 0) + 1 if status is None else 0
        if status not in TERMINAL and self.misses[slug] < self.MISSES:
            return
        self.final[slug] = status or "LOST"
        del self.active[slug]
        self.manifest.runs[slug] |= {"status": self.final[slug], "ended_at": time.time()}
        self.manifest.save()
        (self.logs_dir / f"{slug}.log").write_text(self.executor.logs(job_id))
        log.info(f"[sweep] {slug}: {self.final[slug]} ({len(self.final)} ended, {left + len(self.active)} left)")
        summary = Path(self.args.runs_dir) / self.args.name / slug / "summary.json"
        if status == "SUCCEEDED" and not summary.exists():
            log.warning(f"[sweep] {slug} succeeded but {summary} is not here: is --runs-dir shared with the jobs?")
