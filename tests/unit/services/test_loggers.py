"""TensorBoard and W&B (offline) loggers beside metrics.jsonl: names, steps and values, read back with each
tool's own reader (TensorBoard's event accumulator; W&B's record protobufs in its .wandb log)."""

from __future__ import annotations

import json
import struct
import time

import pytest

from services import metrics
from services.config import ConfigError, load_config
from services.loggers import TensorBoardLogger, WandbConfig, WandbLogger, scalars_of
from services.report import MetricsLog, read_metrics

RECORDS = [
    ("eval", dict(policy_version=0, accuracy=0.25, t_published=0.0)),
    ("rollout", dict(worker_id=0, policy_version=0, groups=4, reward_mean=0.5, generate_s=0.2)),
    ("learner_step", dict(learner_step=1, policy_version=0, loss=0.75, kl_behaviour=0.01, staleness_mean=0.5)),
    ("learner_step", dict(learner_step=2, policy_version=1, loss=0.5, kl_behaviour=0.02, staleness_mean=1.0)),
    ("eval", dict(policy_version=2, accuracy=0.5, t_published=1.5)),
    ("membership", dict(event="joined", worker=3, target=2, members=[0, 3])),
]
SUMMARY = {"eval_accuracy_final": 0.5, "learner_steps": 2, "stopped_by": "max_learner_steps", "synchronous": False}


def _write_run(path, loggers) -> MetricsLog:
    log = MetricsLog(path / "metrics.jsonl", loggers)
    for kind, fields in RECORDS:
        log.write(kind, **fields)
    log.summary(SUMMARY)
    log.close()
    return log


def test_scalar_names_reuse_the_prometheus_names():
    assert metrics.scalar_name("learner_step", "loss") == "flywheel_learner_loss/total"
    assert metrics.scalar_name("learner_step", "kl_behaviour") == "flywheel_learner_kl/behaviour"
    assert metrics.scalar_name("learner_step", "grad_norm") == "flywheel_learner_grad_norm"
    assert metrics.scalar_name("eval", "accuracy") == "flywheel_run_eval_accuracy"
    assert metrics.scalar_name("learner_step", "staleness_mean") == "learner_step/staleness_mean"
    assert metrics.scalar_name("rollout", "reward_mean") == "rollout/reward_mean"
    for (kind, field), _ in metrics._RECORD_METRICS.items():  # every mapped name is a defined metric
        assert metrics.scalar_name(kind, field).split("/")[0] in metrics.BY_NAME


def test_scalars_skip_ids_time_text_lists_and_non_finite():
    rec = {"kind": "membership", "t": 3.0, "event": "joined", "worker": 3, "target": 2, "members": [0, 3]}
    assert scalars_of(rec) == {"membership/target": 2.0}
    rec = {"kind": "learner_step", "t": 1.0, "learner_step": 4, "loss": float("nan"), "skipped": True, "lr": 1e-4}
    assert scalars_of(rec) == {"flywheel_learner_lr": 1e-4}


def test_tensorboard_event_files_hold_every_scalar_with_its_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write_run(tmp_path, [TensorBoardLogger(tmp_path / "tensorboard", {"run": {"name": "x"}})])
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert series["flywheel_learner_loss/total"] == [(1, 0.75), (2, 0.5)]
    assert series["flywheel_learner_kl/behaviour"] == [(1, pytest.approx(0.01)), (2, pytest.approx(0.02))]
    assert series["flywheel_run_eval_accuracy"] == [(0, 0.25), (2, 0.5)]  # x = the last learner step written
    assert series["rollout/reward_mean"] == [(0, 0.5)] and series["membership/target"] == [(2, 2.0)]
    assert series["summary/eval_accuracy_final"] == [(2, 0.5)]
    # every scalar is named after metrics.jsonl's (kind, field), so the two agree one to one
    jsonl = {name for r in read_metrics(tmp_path) for name in scalars_of(r)}
    assert {t for t in series if not t.startswith("summary/")} == jsonl
    assert {"config/text_summary", "summary/text_summary"} <= set(acc.Tags()["tensors"])


def _wandb_records(path):
    """Records of a .wandb file: a 7-byte header, then LevelDB-log framed protobufs in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def test_wandb_offline_run_holds_the_same_names_and_values(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(WandbConfig(group="sweep-a", tags=("ci",)), tmp_path, "run-x", {"learner": {"lr": 0.1}})
    _write_run(tmp_path, [logger])
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30  # wandb-core writes the file on its own; finish() may return first
    recs = _wandb_records(run_file)
    while not any(r.WhichOneof("record_type") == "exit" for r in recs):
        assert time.monotonic() < deadline, f"{run_file} has no exit record 30 s after finish()"
        time.sleep(0.2)
        recs = _wandb_records(run_file)
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    losses = [
        (row["learner_step"], row["flywheel_learner_loss/total"])
        for row in rows
        if "flywheel_learner_loss/total" in row
    ]
    assert losses == [(1, 0.75), (2, 0.5)]
    assert [row["flywheel_run_eval_accuracy"] for row in rows if "flywheel_run_eval_accuracy" in row] == [0.25, 0.5]
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update})
    assert summary["eval_accuracy_final"] == 0.5 and summary["learner_steps"] == 2
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.run_group, list(run.tags)) == ("run-x", "sweep-a", ["ci"])


def test_a_failing_logger_is_dropped_not_fatal(tmp_path):
    class Broken:
        def log(self, *a):
            raise OSError("disk full")

    log = MetricsLog(tmp_path / "metrics.jsonl", [Broken()])
    log.write("learner_step", learner_step=1, loss=1.0)
    log.write("learner_step", learner_step=2, loss=1.0)
    assert log.loggers == [] and len(read_metrics(tmp_path)) == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("run.loggers=[tensorboard]", "lacks 'jsonl'"),
        ("run.loggers=[jsonl,jsonl]", "twice"),
        ("run.loggers=[csv]", "run.loggers"),
    ],
)
def test_logger_config_is_checked_at_start_up(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    cfg = load_config(None, ["run.loggers=[jsonl,tensorboard,wandb]", "run.wandb.mode=online"])
    assert cfg.run.loggers == ("jsonl", "tensorboard", "wandb") and cfg.run.wandb.mode == "online"
