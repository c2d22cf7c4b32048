"""Experiment loggers beside `metrics.jsonl` and Prometheus: TensorBoard event files and Weights & Biases.

Contract:
- `run.loggers` names the sinks of a run's metrics records (services/report.py `MetricsLog`):
  `jsonl` (always: report.png, resume and sweeps read it), `tensorboard` (event files under
  `runs/<name>/tensorboard/`), `wandb` (`runs/<name>/wandb/`; offline by default, so it needs no network
  or account: `wandb sync runs/<name>/wandb/offline-run-*` uploads later).
- Every finite number of a record becomes one scalar, named by `services.metrics.scalar_name`: the
  Prometheus metric's name where one records the same fact (`flywheel_learner_kl/behaviour`), else
  `<kind>/<field>` exactly as in metrics.jsonl (`learner_step/staleness_mean`). Identifier fields
  (worker ids) and the record's time are not scalars. The same names go to every logger.
- The x axis is the learner step: a record's own `learner_step`, else the last one written. TensorBoard
  gets the record's wall-clock time too; W&B gets `learner_step` as its step metric.
- The resolved run config is logged once (TensorBoard text, W&B config); `summary` logs summary.json.
- A logger that fails is logged and dropped: recording never stops a run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from services.metrics import scalar_name

log = logging.getLogger(__name__)

LoggerName = Literal["jsonl", "tensorboard", "wandb"]
_NOT_SCALARS = frozenset({"kind", "t", "worker", "worker_id", "learner_step"})


class WandbConfig(BaseModel):
    """Where `run.loggers: [..., wandb]` sends a run (wandb.init's arguments)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    project: str = Field("flywheel", description="W&B project the run is filed under")
    entity: str | None = Field(None, description="W&B team or user; None = the logged-in default")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline writes runs/<name>/wandb/ with no network (upload later with `wandb sync`); "
        "online streams to the W&B server and needs `wandb login`",
    )
    group: str | None = Field(None, description="W&B group, e.g. a sweep's name (flywheel sweep sets it)")
    tags: tuple[str, ...] = Field((), description="W&B tags for filtering runs")


class ScalarLogger(Protocol):
    def log(self, step: int, wall_time: float, scalars: dict[str, float]) -> None: ...

    def summary(self, summary: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers under their logger names (see the module docstring)."""
    kind = record["kind"]
    out = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[scalar_name(kind, key)] = float(value)
    return out


def _summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class TensorBoardLogger:
    def __init__(self, log_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")
        self.last_step = 0

    def log(self, step: int, wall_time: float, scalars: dict[str, float]) -> None:
        self.last_step = step
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step, walltime=wall_time)

    def summary(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=1) + "\n```", global_step=self.last_step)
        for key, value in _summary_scalars(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, global_step=self.last_step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, cfg: WandbConfig, run_dir: Path, run_name: str, config: dict):
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=run_name,
            group=cfg.group,
            tags=list(cfg.tags),
            mode=cfg.mode,
            dir=str(run_dir),
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )
        # one row per record with its learner step as the x axis, so records sharing a step never overwrite
        self.run.define_metric("learner_step")
        self.run.define_metric("*", step_metric="learner_step")

    def log(self, step: int, wall_time: float, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, "learner_step": step})

    def summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(_summary_scalars(summary))

    def close(self) -> None:
        self.run.finish()


def make_loggers(names: tuple[str, ...], wandb_cfg: WandbConfig, run_dir: Path, run_name: str, config: dict):
    """The scalar loggers `run.loggers` asks for (jsonl is MetricsLog's own file, not one of these)."""
    out: list[ScalarLogger] = []
    if "tensorboard" in names:
        out.append(TensorBoardLogger(run_dir / "tensorboard", config))
    if "wandb" in names:
        out.append(WandbLogger(wandb_cfg, run_dir, run_name, config))
    return out


def check_logger_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """Raise ValueError unless `jsonl` is present and no logger is named twice (a `run.loggers` validator)."""
    if "jsonl" not in names:
        raise ValueError(
            f"run.loggers={list(names)} lacks 'jsonl': metrics.jsonl is the run's record (report.png, --resume "
            "and flywheel sweep read it); add it, e.g. [jsonl, tensorboard]"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"run.loggers={list(names)} names a logger twice; list each once")
    return names
