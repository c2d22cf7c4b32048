"""`python -m services.train_rm --config deploy/configs/preferences/rm_tiny_cpu.yaml [section.field=value ...]`.

Trains a reward model on preference pairs and saves it as a standard HF sequence-classification checkpoint.

Contract: the YAML is a run config (its `model`, `task`, `render`, `cold_start` and `run` sections give the
trunk exactly as the RL driver would build it: the cold-started policy is the RM's starting point, as in
InstructGPT) plus the sections `preferences` (`rollout.preferences.PreferenceDataConfig`),
`rm_training` (`learner.reward_model.RewardModelTrainConfig`) and `dpo` (`learner.dpo.DPOConfig`, read by
`services.train_dpo`). Outputs, under `runs/<run.name>/`:
`reward_model/` (the checkpoint; point `reward.model.path` of an RL run at it), `metrics.jsonl` (one record
per step: `rm/loss`, train and held-out pairwise accuracy and reward gap), the `run.loggers` it names, and
`rm_summary.json`. Exit code 2 on an invalid config or unusable data, before any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from learner.dpo import DPOConfig
from learner.reward_model import RewardModelTrainConfig
from rollout.preferences import PreferenceDataConfig
from services.config import ConfigError, RunConfig, _format_error, _set_dotted, parse_overrides

log = logging.getLogger(__name__)
EXTRA_SECTIONS = ("preferences", "rm_training", "dpo")


class PreferenceSections(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    preferences: PreferenceDataConfig = Field(description="the preference pairs (prompt, chosen, rejected)")
    rm_training: RewardModelTrainConfig = Field(
        default_factory=RewardModelTrainConfig, description="reward-model optimiser, batching and loss settings"
    )
    dpo: DPOConfig = Field(
        default_factory=DPOConfig, description="DPO/IPO/cDPO settings (read by python -m services.train_dpo)"
    )


def load_preference_config(path: str, overrides: list[str]) -> tuple[RunConfig, PreferenceSections]:
    """(the run config, the preference sections) of one YAML + dotted overrides; ConfigError on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {path!r} does not exist; start from deploy/configs/preferences/rm_tiny_cpu.yaml"
        )
    tree = yaml.safe_load(p.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections")
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    extra = {k: tree.pop(k) for k in EXTRA_SECTIONS if k in tree}
    try:
        run_cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
    try:
        sections = PreferenceSections.model_validate(extra)
    except ValidationError as e:
        raise ConfigError(_format_error(e).replace("invalid run config", "invalid preference config")) from None
    return run_cfg, sections


class MetricsWriter:
    """metrics.jsonl plus the run's extra loggers (tensorboard, wandb), one record per step."""

    def __init__(self, cfg: RunConfig, run_dir: Path, config: dict):
        from services.loggers import make_loggers, scalars_of

        self._scalars = scalars_of
        self.file = (run_dir / "metrics.jsonl").open("a")
        self.loggers = make_loggers(cfg.run.loggers, cfg.run.wandb, run_dir, cfg.run.name, config)

    def __call__(self, step: int, record: dict) -> None:
        now = time.time()
        self.file.write(json.dumps({"learner_step": step, "time": now, **record}) + "\n")
        self.file.flush()
        for logger in self.loggers:
            logger.log(step, now, self._scalars(record))

    def close(self, summary: dict) -> None:
        self.file.close()
        for logger in self.loggers:
            logger.summary(summary)
            logger.close()


def train(run_cfg: RunConfig, sections: PreferenceSections) -> dict:
    from learner.reward_model import init_reward_model, save_reward_model, train_reward_model
    from rollout.preferences import load_preferences
    from rollout.render import Renderer
    from services.driver import prepare_model

    run_dir = Path(run_cfg.run.runs_dir) / run_cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    trunk, _ = prepare_model(run_cfg, Path(run_cfg.run.cache_dir).resolve())
    renderer = Renderer.from_pretrained(run_cfg.render, trunk)
    data = load_preferences(sections.preferences, renderer)
    log.info("preference pairs: %d train, %d held out, skipped %s", len(data.train), len(data.eval), data.skipped)
    verified = None
    if sections.rm_training.verified_only:
        data, verified = keep_verified(data, run_cfg, renderer)
    model = init_reward_model(trunk, seed=sections.rm_training.seed)
    writer = MetricsWriter(run_cfg, run_dir, {"run": run_cfg.model_dump(mode="json"), **sections.model_dump()})
    t0 = time.perf_counter()
    final = train_reward_model(model, data.train, data.eval, sections.rm_training, on_metrics=writer)
    out = save_reward_model(model, trunk, run_dir / "reward_model")
    summary = {
        **final,
        "train_pairs": len(data.train),
        "eval_pairs": len(data.eval),
        "skipped_rows": data.skipped,
        "verified_only": verified,
        "train_s": time.perf_counter() - t0,
        "reward_model": str(out.resolve()),
        "trunk": str(trunk),
    }
    writer.close(summary)
    (run_dir / "rm_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def keep_verified(data, run_cfg: RunConfig, renderer):
    """`rm_training.verified_only`: (data with only verified pairs, {split: {kept, dropped}}), logged;
    DatasetError when no training pair is left."""
    from rollout.datasets import DatasetError
    from rollout.preferences import verified_pairs
    from rollout.tasks import make_task

    task = make_task(run_cfg.task, renderer)
    train, held = verified_pairs(data.train, renderer, task.score), verified_pairs(data.eval, renderer, task.score)
    counts = {n: {"kept": len(v.kept), "dropped": v.dropped} for n, v in (("train", train), ("eval", held))}
    log.info("rm_training.verified_only: kept %s", counts)
    if not train.kept or not held.kept:
        raise DatasetError(
            f"rm_training.verified_only left no verified pair ({counts}): the data needs a reference answer "
            f"column (preferences.answer_key) that task.kind={run_cfg.task.kind!r}'s verifier accepts for the "
            "chosen replies; fix the data or set rm_training.verified_only=false"
        )
    return dataclasses.replace(data, train=train.kept, eval=held.kept), counts


def preference_cli(argv: list[str] | None, doc: str, train_fn, sections: str, example: str) -> int:
    """The command line of a preference-training command (`train_rm`, `train_dpo`): load the config, train,
    print the summary; exit code 2 with the reason on a bad config or dataset."""
    from rollout.datasets import DatasetError

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", required=True, help=f"a run YAML with {sections} sections")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        run_cfg, sections = load_preference_config(args.config, args.overrides)
        summary = train_fn(run_cfg, sections)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    return preference_cli(argv, __doc__, train, "preferences and rm_training", "rm_training.steps=50")


if __name__ == "__main__":
    sys.exit(main())
