"""Real Prometheus (Debian's, installed by .ci/run) scraping a real `ray job submit` run on loopback.

- the alert rules pass `promtool test rules` (deploy/prometheus/alerts_test.yml) and the configs check;
- a local head started with `--metrics-export-port` runs deploy/configs/e2e_small.yaml; Prometheus,
  configured from deploy/prometheus/prometheus.yml with a static loopback target, answers PromQL for
  every component with values that match the run's own summary;
- every expression of deploy/grafana/flywheel.json is valid PromQL and (but for the few that only
  show rare events) returns data at a moment the job was training.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.local_ray import free_port, job_logs, local_ray_head, stop_process_group, submit_driver, wait_http, wait_job

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy/prometheus"
pytestmark = [pytest.mark.prometheus, pytest.mark.integration]
WINDOW = "[20m]"
# Dashboard expressions that only show rare events or driver-recorded values (not wired in e2e_small).
MAY_BE_EMPTY = (
    "rejected_traces",
    "nonfinite_loss",
    "weight_sync_errors",
    "weight_sync_timeouts",
    "weight_sync_version_lag",
    "rollout_gold_reward_mean",  # reward.kind=model only; this job scores with the verifier
    "rollout_model_score_mean",
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, (
        f"{name} not found: .ci/run installs Debian's prometheus (apt-get install -y --no-install-recommends "
        "prometheus)"
    )
    return path


def test_alert_rules_pass_promtool_unit_tests():
    promtool = _tool("promtool")
    out = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM_DIR, capture_output=True, text=True)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=PROM_DIR, capture_output=True, text=True)
    assert out.returncode == 0 and "5 rules found" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(
        [promtool, "check", "config", "--syntax-only", "prometheus.yml"], cwd=PROM_DIR, capture_output=True, text=True
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


@pytest.fixture
def ray_head_with_metrics():
    metrics_port = free_port()
    with local_ray_head(metrics_port=metrics_port) as (env, address):
        yield env, address, metrics_port


@pytest.fixture
def prometheus_for(tmp_path):
    """Start Prometheus on loopback with our config, the Ray scrape job pointed at a static target."""
    procs = []

    def start(metrics_port: int) -> str:
        cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        cfg["rule_files"] = [str(PROM_DIR / f) for f in cfg["rule_files"]]
        (job,) = cfg["scrape_configs"]
        job.pop("file_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        web = free_port()
        proc = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("w"),
            start_new_session=True,
        )
        procs.append(proc)
        wait_http(f"http://127.0.0.1:{web}/-/ready", proc, timeout_s=60)
        return f"http://127.0.0.1:{web}"

    yield start
    for p in procs:
        stop_process_group(p)


def _query(prom: str, expr: str, at: float | None = None) -> list[dict]:
    params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
    try:
        body = json.loads(
            urllib.request.urlopen(f"{prom}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=30).read()
        )
    except urllib.error.HTTPError as e:
        pytest.fail(f"PromQL {expr!r} rejected: {e.read().decode()}")
    assert body["status"] == "success", body
    return body["data"]["result"]


def _values(prom: str, expr: str, by: str | None = None) -> dict:
    out = {(r["metric"].get(by) if by else None): float(r["value"][1]) for r in _query(prom, expr)}
    if not out:
        names = sorted(
            r["metric"]["__name__"]
            for r in _query(prom, 'count by (__name__) (last_over_time({__name__=~"ray_flywheel_.+"}' + WINDOW + "))")
        )
        pytest.fail(f"no data for {expr!r}; Prometheus holds these Flywheel series: {names}")
    return out


def _submit(env: dict, address: str, runs: Path) -> str:
    return submit_driver(env, address, runs, "prom")


def _wait_job(env: dict, address: str, job_id: str, timeout_s: float) -> None:
    status = wait_job(env, address, job_id, timeout_s)
    if status != "SUCCEEDED":
        pytest.fail(f"job {job_id} ended {status}:\n{job_logs(env, address, job_id)}")


def _dashboard_exprs() -> list[str]:
    dash = json.loads((REPO / "deploy/grafana/flywheel.json").read_text())
    panels = [p for p in dash["panels"]] + [c for p in dash["panels"] for c in p.get("panels", [])]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


@pytest.mark.slow
def test_prometheus_scrapes_a_ray_job(ray_head_with_metrics, prometheus_for, tmp_path):
    env, address, metrics_port = ray_head_with_metrics
    prom = prometheus_for(metrics_port)
    job_id = _submit(env, address, tmp_path / "runs")
    _wait_job(env, address, job_id, timeout_s=900)
    time.sleep(3)  # the last export and scrape
    summary = json.loads((tmp_path / "runs/prom/summary.json").read_text())
    evals = [json.loads(line) for line in (tmp_path / "runs/prom/metrics.jsonl").read_text().splitlines()]
    accuracies = {r["accuracy"] for r in evals if r["kind"] == "eval"}

    up = _values(prom, 'max_over_time(up{job="ray"}' + WINDOW + ")")
    assert up == {None: 1.0}, up
    # rollout
    tokens = _values(prom, "max_over_time(ray_flywheel_rollout_tokens_total" + WINDOW + ")", by="worker")
    assert set(tokens) == {"0"} and tokens["0"] > 0
    engine_v = _values(prom, "max_over_time(ray_flywheel_rollout_policy_version" + WINDOW + ")", by="worker")
    assert 1 <= engine_v["0"] <= summary["policy_versions_published"]
    gen_len = _values(prom, "max(max_over_time(ray_flywheel_rollout_completion_tokens_count" + WINDOW + "))")[None]
    assert gen_len >= summary["traces_consumed"]  # every consumed trace was generated (and observed) first
    # replay
    inserted = _values(prom, "sum(max_over_time(ray_flywheel_replay_inserted_groups_total" + WINDOW + "))")[None]
    sampled = _values(prom, "sum(max_over_time(ray_flywheel_replay_sampled_groups_total" + WINDOW + "))")[None]
    assert sampled == summary["groups_consumed"] and inserted >= sampled
    bound = _values(prom, "max(max_over_time(ray_flywheel_replay_staleness_bound" + WINDOW + "))")[None]
    assert bound == summary["max_staleness_bound"] == 2
    stale_max = _values(prom, "max(max_over_time(ray_flywheel_replay_sampled_staleness_max" + WINDOW + "))")[None]
    assert 0 <= stale_max <= summary["max_staleness_seen"]  # a gauge: a later sample may overwrite the peak unscraped

    def staleness_at_most(k: float) -> float:
        return _values(prom, f'max(max_over_time(ray_flywheel_replay_staleness_bucket{{le="{k}"}}' + WINDOW + "))")[
            None
        ]

    # the histogram is exact: every sampled group is counted, and its top bucket is the run's max staleness
    m = summary["max_staleness_seen"]
    assert staleness_at_most(m + 0.5) == staleness_at_most(2.5) == summary["groups_consumed"]
    assert m == 0 or staleness_at_most(m - 0.5) < summary["groups_consumed"]
    # learner: both ranks, every step, finite loss
    steps = _values(prom, "max_over_time(ray_flywheel_learner_steps_total" + WINDOW + ")", by="rank")
    assert steps == {"0": summary["learner_steps"], "1": summary["learner_steps"]}
    loss = _values(prom, 'last_over_time(ray_flywheel_learner_loss{term="total"}' + WINDOW + ")", by="rank")
    assert set(loss) == {"0", "1"} and all(math.isfinite(v) for v in loss.values())
    kl = _values(prom, 'last_over_time(ray_flywheel_learner_kl{against="behaviour"}' + WINDOW + ")", by="rank")
    assert set(kl) == {"0", "1"}
    # weight sync: one broadcast per published version, a real payload
    sends = _values(prom, "max_over_time(ray_flywheel_weight_sync_send_seconds_count" + WINDOW + ")")[None]
    assert sends == summary["policy_versions_published"]
    nbytes = _values(prom, "max_over_time(ray_flywheel_weight_sync_bytes_total" + WINDOW + ")")[None]
    assert nbytes > 0 and nbytes % sends == 0  # the same model every time
    # run level
    assert (
        _values(prom, "max_over_time(ray_flywheel_run_policy_version" + WINDOW + ")")[None]
        == summary["policy_versions_published"]
    )
    acc = _values(prom, "max_over_time(ray_flywheel_run_eval_accuracy" + WINDOW + ")")[None]
    assert acc in accuracies, (acc, accuracies)
    pass_k = _values(prom, "max_over_time(ray_flywheel_run_pass_at_k" + WINDOW + ")", by="k")
    assert set(pass_k) == {"1", "2", "4"} and all(0.0 <= v <= 1.0 for v in pass_k.values())
    # the loaded alert rules are healthy, and none fires for a healthy run
    rules = json.loads(urllib.request.urlopen(f"{prom}/api/v1/rules", timeout=10).read())["data"]["groups"]
    assert {r["name"]: r["health"] for g in rules for r in g["rules"]} == dict.fromkeys(
        [
            "FlywheelLearnerStalled",
            "FlywheelRolloutWorkerDown",
            "FlywheelStalenessAboveBound",
            "FlywheelWorkerLagAboveBound",
            "FlywheelNaNLoss",
        ],
        "ok",
    )
    _check_dashboard(prom)


def _check_dashboard(prom: str) -> None:
    """Each panel query, over the job's whole span (as a Grafana time range would show it), has data."""
    end = time.time()
    empty = []
    for expr in _dashboard_exprs():
        q = expr.replace("$__rate_interval", "1m").replace("$__range", "10m")
        params = urllib.parse.urlencode({"query": q, "start": f"{end - 1200:.3f}", "end": f"{end:.3f}", "step": "5"})
        try:
            body = json.loads(urllib.request.urlopen(f"{prom}/api/v1/query_range?{params}", timeout=60).read())
        except urllib.error.HTTPError as e:
            pytest.fail(f"dashboard PromQL {q!r} rejected: {e.read().decode()}")
        assert body["status"] == "success", body
        if not body["data"]["result"] and not any(k in expr for k in MAY_BE_EMPTY):
            empty.append(expr)
    assert not empty, f"dashboard queries with no data during the job: {empty}"
