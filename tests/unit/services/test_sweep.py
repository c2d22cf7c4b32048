"""`flywheel sweep` without Ray: grid expansion and validation, resumability, the concurrency limit, the report.

A fake executor plays the Ray Job Submission API: "running" a job writes what the driver would
(summary.json and metrics.jsonl in the run's directory), so the whole command runs end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import shlex
from pathlib import Path

import pytest

from services import cli, sweep, sweep_jobs
from services.config import ConfigError
from services.sweep_report import setting_rows, write_report

CONFIG = "deploy/configs/e2e_small.yaml"


def _driver_args(entrypoint: str) -> dict[str, str]:
    words = shlex.split(entrypoint)
    assert words[:4] == ["python", "-m", "services.driver", "--config"]
    return dict(w.split("=", 1) for w in words[5:])


class FakeJobs:
    """Each job takes `polls` status polls, then 'runs' (writes a driver's outputs) and ends as `outcome`."""

    def __init__(self, polls: int = 2, fail: tuple[str, ...] = ()):
        self.polls, self.fail = polls, fail
        self.jobs: dict[str, dict] = {}
        self.max_running = 0

    def submit(self, entrypoint: str, runtime_env: dict, job_id: str) -> str:
        assert job_id not in self.jobs and runtime_env["working_dir"]
        self.jobs[job_id] = {"args": _driver_args(entrypoint), "left": self.polls, "status": "RUNNING"}
        return job_id

    def status(self, job_id: str) -> str | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        self.max_running = max(self.max_running, sum(j["status"] == "RUNNING" for j in self.jobs.values()))
        if job["status"] == "RUNNING":
            job["left"] -= 1
            if job["left"] <= 0:
                job["status"] = self._finish(job["args"])
        return job["status"]

    def _finish(self, args: dict) -> str:
        run_dir = Path(args["run.runs_dir"]) / args["run.name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        if any(f in args["run.name"] for f in self.fail):
            return "FAILED"
        kl = float(args.get("learner.objective.kl_behaviour_coef", 0))
        seed = int(args["rollout.seed"])
        recs = [{"kind": "eval", "t": 0.0, "accuracy": 0.1}, {"kind": "eval", "t": 5.0, "accuracy": 0.3 + seed / 10}]
        recs += [{"kind": "learner_step", "t": float(i), "learner_step": i, "kl_behaviour": kl * i} for i in (1, 2)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        summary = {"eval_accuracy_initial": 0.1, "eval_accuracy_final": 0.3 + seed / 10, "eval_accuracy_best": 0.5}
        summary |= {"learner_steps": 2, "rl_wall_s": 5.0, "wall_s": 9.0, "stopped_by": "max_learner_steps"}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return "SUCCEEDED"

    def logs(self, job_id: str) -> str:
        return f"logs of {job_id}"


@pytest.fixture
def fake(monkeypatch):
    jobs = FakeJobs()
    heads = []

    @contextlib.contextmanager
    def fake_head(num_cpus):
        heads.append(num_cpus)
        yield "http://127.0.0.1:1"

    monkeypatch.setattr(sweep, "JobExecutor", lambda address: jobs)
    monkeypatch.setattr("services.ray_head.local_head", fake_head)
    jobs.heads = heads
    return jobs


def _sweep(tmp_path, *extra: str) -> int:
    argv = ["sweep", "--config", CONFIG, "--name", "s", "--runs-dir", str(tmp_path), "--poll-s", "0"]
    argv += ["--grid", "learner.objective.kl_behaviour_coef=0,0.01", "rollout.temperature=0.7,1.0", "--seeds", "0,1"]
    return cli.main(argv + list(extra))


def test_grid_values_may_be_variants_with_commas_inside():
    axes = sweep.parse_grid(["learner.objective.advantage=grpo,{kind: pass_at_k, k: 2}"])
    assert axes[0].values == ("grpo", {"kind": "pass_at_k", "k": 2})
    runs = sweep.plan_runs(CONFIG, "s", axes, [0], ["rollout.seed"], [])
    assert [r.slug for r in runs] == ["advantage=grpo,seed=0", "advantage=pass_at_k+k=2,seed=0"]
    assert "learner.objective.advantage={kind: pass_at_k, k: 2}" in runs[1].overrides


def test_grid_times_seeds_with_linked_temperature_and_seed_fields():
    axes = sweep.parse_grid(["learner.lr=1e-4,3e-4", "rollout.temperature=0.7,1.0"])
    runs = sweep.plan_runs(CONFIG, "s", axes, [0, 1], ["rollout.seed", "replay.seed"], ["run.max_learner_steps=3"])
    assert len(runs) == 8 and len({r.slug for r in runs}) == 8
    r = runs[0]
    assert r.slug == "lr=1e-4,temperature=0.7,seed=0" and r.setting_label == "lr=1e-4,temperature=0.7"
    assert "learner.temperature=0.7" in r.overrides  # importance ratios need equal temperatures
    assert {"rollout.seed=0", "replay.seed=0", "run.max_learner_steps=3"} <= set(r.overrides)
    assert runs[0].fingerprint != runs[1].fingerprint  # the seed is part of the config
    same = sweep.plan_runs(CONFIG, "s", axes, [0, 1], ["rollout.seed", "replay.seed"], ["run.max_learner_steps=3"])
    assert [x.fingerprint for x in same] == [x.fingerprint for x in runs]
    other = sweep.plan_runs(CONFIG, "s", axes, [0, 1], ["rollout.seed"], ["run.max_learner_steps=4"])
    assert other[0].fingerprint != runs[0].fingerprint


@pytest.mark.parametrize(
    "grid, message",
    [
        (["learner.lr"], "not KEY=V1,V2"),
        (["learner.lr=1e-4", "learner.lr=2e-4"], "twice"),
        (["learner.lr=fast"], "sweep run lr=fast,seed=0: invalid run config"),
        (["learner.objective.kl_behaviour_coef=-1"], "learner.objective.kl_behaviour_coef"),
    ],
)
def test_bad_grids_are_refused_before_anything_runs(grid, message):
    with pytest.raises(ConfigError, match=message):
        sweep.plan_runs(CONFIG, "s", sweep.parse_grid(grid), [0], ["rollout.seed"], [])


def test_cli_exits_2_on_a_bad_grid_or_name(tmp_path, fake, capsys):
    argv = ["sweep", "--config", CONFIG, "--name", "s", "--runs-dir", str(tmp_path), "--grid", "learner.lr=x"]
    assert cli.main(argv) == 2
    assert "learner.lr" in capsys.readouterr().err and not fake.jobs
    assert cli.main(["sweep", "--config", CONFIG, "--name", "a/b"]) == 2


def test_sweep_runs_every_job_within_the_limit_then_reports(tmp_path, fake):
    assert _sweep(tmp_path, "--max-concurrent", "3") == 0
    assert len(fake.jobs) == 8 and fake.max_running == 3
    args = [j["args"] for j in fake.jobs.values()]
    assert {a["run.name"].split("/")[0] for a in args} == {"s"} and all(a["run.resume"] == "auto" for a in args)
    assert all(a["run.wandb.group"] == "s" and Path(a["run.cache_dir"]).is_absolute() for a in args)
    assert fake.heads and fake.heads[0] >= 3 * 1.5  # logical CPUs for 3 concurrent e2e_small runs
    out = tmp_path / "s"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"finished"}
    results = json.loads((out / "results.json").read_text())
    by_setting = {s["setting"]: s for s in results["settings"]}
    s = by_setting["kl_behaviour_coef=0.01,temperature=0.7"]
    assert s["seeds"] == 2 and s["eval_accuracy_final"] == pytest.approx(0.35)  # seeds 0, 1 -> 0.3, 0.4
    assert s["eval_accuracy_final_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert s["kl_behaviour_final"] == pytest.approx(0.02)  # the last tenth of steps: step 2
    report = (out / "report.md").read_text()
    assert "| kl_behaviour_coef=0.01,temperature=0.7 | 2/2 | 0.35 ± 0.071 |" in report
    assert (out / "accuracy_vs_time.png").stat().st_size > 10_000 and (out / "curves.png").exists()
    manifest = json.loads((out / "sweep.json").read_text())
    assert {r["status"] for r in manifest["runs"].values()} == {"SUCCEEDED"}
    assert (out / "logs" / "kl_behaviour_coef=0,temperature=0.7,seed=1.log").read_text().startswith("logs of")


def test_rerun_skips_finished_resumes_unfinished_and_restarts_changed(tmp_path, fake):
    assert _sweep(tmp_path) == 0
    first = set(fake.jobs)
    assert _sweep(tmp_path) == 0 and set(fake.jobs) == first  # all finished: nothing submitted
    (tmp_path / "s" / "kl_behaviour_coef=0,temperature=1.0,seed=1" / "summary.json").unlink()
    assert _sweep(tmp_path) == 0
    new = [fake.jobs[j]["args"] for j in set(fake.jobs) - first]
    assert [a["run.name"] for a in new] == ["s/kl_behaviour_coef=0,temperature=1.0,seed=1"]
    assert new[0]["run.resume"] == "auto"  # continues from its latest checkpoint, if it has one
    before = set(fake.jobs)
    assert _sweep(tmp_path, "--set", "run.max_learner_steps=2") == 0  # every config changed: all start over
    changed = [fake.jobs[j]["args"] for j in set(fake.jobs) - before]
    assert len(changed) == 8 and all(a["run.resume"] == "never" for a in changed)


def test_failed_runs_exit_1_and_are_retried_by_a_rerun(tmp_path, fake, capsys):
    fake.fail = ("seed=1",)
    assert _sweep(tmp_path) == 1
    assert "4 run(s) did not succeed" in capsys.readouterr().out
    rows = {r["run"]: r["status"] for r in csv.DictReader((tmp_path / "s" / "results.csv").open())}
    assert sorted(rows.values()).count("unfinished") == 4
    fake.fail = ()
    n = len(fake.jobs)
    assert _sweep(tmp_path) == 0 and len(fake.jobs) == n + 4


def test_a_job_still_running_on_the_cluster_is_adopted_not_resubmitted(tmp_path, fake, caplog):
    caplog.set_level(logging.INFO)
    runs = sweep.plan_runs(CONFIG, "s", sweep.parse_grid(["learner.lr=1e-4"]), [0], ["rollout.seed"], [])
    manifest = sweep_jobs.Manifest(tmp_path / "sweep.json", {})
    manifest.runs[runs[0].slug] = {"job_id": "old-job", "fingerprint": runs[0].fingerprint}
    old_args = {"run.runs_dir": str(tmp_path), "run.name": f"s/{runs[0].slug}", "rollout.seed": "0"}
    fake.jobs["old-job"] = {"args": old_args, "left": 2, "status": "RUNNING"}  # a previous invocation's job
    args = argparse.Namespace(max_concurrent=1, name="s", poll_s=0, runs_dir=str(tmp_path))
    (tmp_path / "logs").mkdir()
    job = (runs[0], "python -m services.driver --config x")
    final = sweep_jobs.Scheduler(fake, manifest, args, {"working_dir": "."}, tmp_path / "logs").run([job])
    assert final == {runs[0].slug: "SUCCEEDED"} and list(fake.jobs) == ["old-job"]
    assert "still running" in caplog.text and "warning" not in caplog.text.lower()


def test_a_job_the_head_forgets_is_lost_only_after_several_polls(tmp_path, fake, caplog):
    caplog.set_level(logging.INFO)
    runs = sweep.plan_runs(CONFIG, "s", sweep.parse_grid(["learner.lr=1e-4"]), [0], ["rollout.seed"], [])
    forgetful = iter([None, None, "RUNNING", None, None, None])  # one hiccup, then gone for good
    fake.status = lambda job_id: next(forgetful)
    manifest = sweep_jobs.Manifest(tmp_path / "sweep.json", {})
    (tmp_path / "logs").mkdir()
    args = argparse.Namespace(max_concurrent=1, name="s", poll_s=0, runs_dir=str(tmp_path))
    sched = sweep_jobs.Scheduler(fake, manifest, args, {"working_dir": "."}, tmp_path / "logs")
    assert sched.run([(runs[0], "python -m services.driver --config x")]) == {runs[0].slug: "LOST"}
    assert "is not here" not in caplog.text and "LOST" in caplog.text  # only a SUCCEEDED run without summary warns
    assert manifest.runs[runs[0].slug]["status"] == "LOST" and next(forgetful, "done") == "done"


def test_a_succeeded_run_whose_summary_is_not_visible_warns(tmp_path, fake, caplog):
    runs = sweep.plan_runs(CONFIG, "s", sweep.parse_grid(["learner.lr=1e-4"]), [0], ["rollout.seed"], [])
    elsewhere = {"run.runs_dir": str(tmp_path / "cluster-disk"), "run.name": f"s/{runs[0].slug}", "rollout.seed": "0"}
    fake.submit = lambda entrypoint, env, job_id: fake.jobs.setdefault(
        job_id, {"args": elsewhere, "left": 1, "status": "RUNNING"}
    )
    (tmp_path / "logs").mkdir()
    args = argparse.Namespace(max_concurrent=1, name="s", poll_s=0, runs_dir=str(tmp_path))
    sched = sweep_jobs.Scheduler(fake, sweep_jobs.Manifest(tmp_path / "sweep.json", {}), args, {}, tmp_path / "logs")
    assert sched.run([(runs[0], "python -m services.driver")]) == {runs[0].slug: "SUCCEEDED"}
    assert "is --runs-dir shared with the jobs?" in caplog.text


def test_report_of_runs_not_started_lists_them_without_numbers(tmp_path):
    runs = sweep.plan_runs(CONFIG, "s", sweep.parse_grid(["learner.lr=1e-4,2e-4"]), [0], ["rollout.seed"], [])
    (tmp_path / runs[0].slug).mkdir()
    write_report(tmp_path, runs)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["status"] for r in rows] == ["unfinished", "not started"]
    assert setting_rows(json.loads((tmp_path / "results.json").read_text())["runs"])[0]["seeds"] == 0
