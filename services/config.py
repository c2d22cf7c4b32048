"""`RunConfig`: the whole run, composed from each package's section, loaded from YAML + dotted overrides.

Contract: every field is validated at start-up (unknown keys, wrong types, cross-section rules,
a nonexistent `model.path`); a failure raises `ConfigError` whose message names the dotted field and
the fix, before any process is started. The resolved config is written to `runs/<name>/config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from learner.advantage_estimators import ADVANTAGES
from learner.config import LearnerConfig
from learner.objective import min_group_size, zero_on_uniform_groups
from learner.sft import SFTConfig
from learner.tiny_model import TinyModelSpec
from replay.config import ReplayConfig
from rollout.config import RolloutConfig
from rollout.datasets import DatasetTaskConfig
from rollout.reasoning_gym_task import ReasoningGymTaskConfig
from rollout.render import RenderConfig
from rollout.rewards import RewardConfig
from rollout.tasks import TaskConfig
from services.loggers import LoggerName, WandbConfig, check_logger_names

REPO_ROOT = Path(__file__).resolve().parent.parent


# vLLM's CPU attention kernels (vllm/v1/attention/backends/cpu_attn.py `get_supported_head_sizes`).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ConfigError(ValueError):
    """A run config is invalid; the message names the field and what to do."""


def _tiny(field: str):
    """The built-in model's default for `field`, so the run config and `TinyModelSpec` cannot drift apart."""
    return TinyModelSpec.model_fields[field].default


def _task_kind(value: Any) -> str:
    """`task.kind`, defaulting to the generated arithmetic task when a YAML omits it."""
    return value.get("kind", "arithmetic") if isinstance(value, dict) else getattr(value, "kind", "arithmetic")


class ModelConfig(BaseModel):
    """Either a local HF model directory (`path`) or a built-in model (built offline, cached by spec).

    The size fields apply to the built-in models only (defaults: `learner.tiny_model.TinyModelSpec`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str | None = Field(
        None, description="a local HF model directory (config, weights, tokenizer); None = built-in"
    )
    builtin: Literal["char_llama", "bpe_qwen2"] = Field(
        "char_llama",
        description="without path: char_llama (one token per character, BOS, no chat template; arithmetic-sized) or "
        "bpe_qwen2 (Qwen2 architecture, byte-level BPE trained on the task's text, no BOS, ChatML template)",
    )
    hidden_size: int = Field(_tiny("hidden_size"), ge=16, description="built-in models: width")
    intermediate_size: int = Field(_tiny("intermediate_size"), ge=16, description="built-in models: MLP width")
    num_hidden_layers: int = Field(_tiny("num_hidden_layers"), ge=1, description="built-in models: depth")
    num_attention_heads: int = Field(
        _tiny("num_attention_heads"), ge=1, description="built-in models: heads (hidden_size / heads is the head size)"
    )
    max_position_embeddings: int = Field(
        _tiny("max_position_embeddings"), ge=8, description="built-in models: positions; >= rollout.max_model_len"
    )
    num_key_value_heads: int | None = Field(
        None, ge=1, description="bpe_qwen2: grouped-query KV heads (None = half the attention heads)"
    )
    vocab_size: int = Field(
        1024, ge=260, description="bpe_qwen2: BPE vocabulary to train (256 bytes + 3 specials + merges)"
    )
    tie_word_embeddings: bool = Field(True, description="bpe_qwen2: share input and output embeddings, as small Qwens")
    tokenizer_corpus_problems: int = Field(
        4000, ge=10, description="bpe_qwen2: training problems whose prompt and reference answer train the tokenizer"
    )
    seed: int = Field(0, description="built-in models: seeds the initial weights")


class LoopConfig(BaseModel):
    """What the driver does: how long, how often it evaluates, checkpoints and publishes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(
        "tiny-cpu", description="run name: outputs go to <runs_dir>/<name>/ (metrics, checkpoints, final_model, report)"
    )
    runs_dir: str = Field("runs", description="parent directory of every run's output directory")
    cache_dir: str = Field(
        ".cache", description="built-in models, cold-start checkpoints and tokenizers, keyed by their config hash"
    )
    max_learner_steps: int = Field(200, ge=1, description="stop after this many learner steps (optimiser updates)")
    max_wall_s: float = Field(
        900.0, gt=0, description="stop after this many seconds of RL (cold start and start-up not counted)"
    )
    eval_every_steps: int = Field(
        10, ge=1, description="held-out evaluation every N learner steps (and at the end); lower = finer curves, slower"
    )
    stop_at_gain: float | None = Field(
        None, description="stop once eval accuracy >= initial + this (e.g. 0.2); None = run to max_learner_steps"
    )
    # 500 steps is ~100 s of the default job (~5 steps/s); a checkpoint there costs well under a step.
    checkpoint_every_steps: int = Field(
        500,
        ge=0,
        description=(
            "checkpoint at the first publish after this many learner steps since the last; 0 = only at a clean stop"
        ),
    )
    keep_checkpoints: int = Field(2, ge=1, description="how many step-<N> checkpoints to keep (older ones are deleted)")
    resume: Literal["never", "auto"] = Field(
        "never", description="auto = continue from runs/<name>/checkpoints/latest when it exists"
    )
    max_buffered_steps: int = Field(2, ge=1, description="rollout runs at most this many learner steps of groups ahead")
    eval_worker: Literal["rollout", "dedicated"] = Field(
        "rollout",
        description=(
            "who runs the in-run evaluation: `rollout` = the lowest-numbered rollout worker, between its rollout "
            "calls (no extra actor; its generation, and so every weight update, waits while it evaluates); "
            "`dedicated` = one more worker with the rollout resources that only evaluates, on learner rank 0's "
            "snapshot of the published weights (one model of bytes through the object store per evaluation); "
            "use it when evaluation is long, e.g. big eval sets or long reasoning completions"
        ),
    )
    max_worker_replacements: int = Field(
        16, ge=0, description="rollout workers that may die and be replaced before the run fails"
    )
    num_cpus: int | None = Field(None, description="CPUs for a local Ray (None = all)")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="local Ray only: serve Prometheus metrics on this port"
    )
    progress: bool = Field(True, description="progress bars on the driver's console (off in CI logs)")
    loggers: tuple[LoggerName, ...] = Field(
        ("jsonl",),
        description=(
            "where metrics go besides Prometheus: jsonl (metrics.jsonl, required), tensorboard "
            "(runs/<name>/tensorboard/), wandb (runs/<name>/wandb/, see run.wandb); same metric names in each"
        ),
    )
    wandb: WandbConfig = Field(
        default_factory=WandbConfig, description="W&B project/entity/mode/group/tags when run.loggers has wandb"
    )

    @field_validator("loggers")
    @classmethod
    def _loggers(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return check_logger_names(names)


class RunConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    run: LoopConfig = Field(
        default_factory=LoopConfig, description="the driver: run length, evaluation, checkpoints, resume, loggers"
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="the policy checkpoint: a local HF model directory or a built-in model"
    )
    task: Annotated[
        Annotated[TaskConfig, Tag("arithmetic")]
        | Annotated[DatasetTaskConfig, Tag("dataset")]
        | Annotated[ReasoningGymTaskConfig, Tag("reasoning_gym")],
        Discriminator(_task_kind),
    ] = Field(
        default_factory=TaskConfig,
        description="kind: arithmetic (generated), dataset (JSONL/Parquet/save_to_disk) or reasoning_gym (generator)",
    )
    render: RenderConfig = Field(
        default_factory=RenderConfig, description="how prompts become token ids and what stops a completion"
    )
    cold_start: SFTConfig | None = Field(
        default_factory=SFTConfig,
        description="supervised fine-tuning before RL (null = start RL from the model as given)",
    )
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="rollout workers: engine, sampling, group size, resources"
    )
    reward: RewardConfig = Field(
        default_factory=RewardConfig, description="how completions are scored beyond the task's verifier"
    )
    replay: ReplayConfig = Field(
        default_factory=ReplayConfig, description="the replay buffer: shards, sampling, staleness, rate limit, storage"
    )
    learner: LearnerConfig = Field(
        default_factory=LearnerConfig, description="the DeepSpeed learner: optimiser, precision, objective, weight sync"
    )

    @model_validator(mode="after")
    def _cross(self) -> RunConfig:
        if self.learner.temperature != self.rollout.temperature:
            raise ValueError(
                f"learner.temperature={self.learner.temperature} != rollout.temperature={self.rollout.temperature}; "
                "importance ratios compare the sampling distribution, so set both to the same value"
            )
        if self.learner.weight_sync.inflight == "pause" and self.rollout.engine != "vllm":
            raise ValueError(
                "learner.weight_sync.inflight='pause' swaps weights between engine steps, which only the vLLM "
                "engine does; "
                f"rollout.engine={self.rollout.engine!r}: set rollout.engine=vllm or weight_sync.inflight=drain"
            )
        if self.run.eval_worker == "dedicated" and not self.learner.snapshot_weights:
            raise ValueError(
                "run.eval_worker='dedicated' loads learner rank 0's weight snapshot, which "
                f"learner.weight_sync.snapshot={self.learner.weight_sync.snapshot!r} (zero_stage="
                f"{self.learner.zero_stage}) does not keep: set weight_sync.snapshot=device or run.eval_worker=rollout"
            )
        if self.rollout.device != self.learner.device:
            raise ValueError(
                f"rollout.device={self.rollout.device!r} != learner.device={self.learner.device!r}; the weight "
                "broadcast needs one backend"
            )
        objective = self.learner.objective
        if self.rollout.drop_uniform_groups and not zero_on_uniform_groups(objective):
            raise ValueError(
                f"rollout.drop_uniform_groups=true drops groups whose rewards are all equal, but "
                f"learner.objective.advantage={objective.advantage.kind!r} gives them a non-zero advantage; "
                f"use one of {list(ADVANTAGES.with_tag('zero_on_uniform_groups'))} or set drop_uniform_groups=false"
            )
        if min_group_size(objective) > self.rollout.group_size:
            raise ValueError(
                f"learner.objective.advantage {objective.advantage.model_dump()} needs groups of at least "
                f"{min_group_size(objective)} samples but rollout.group_size={self.rollout.group_size}: "
                "raise rollout.group_size or lower learner.objective.advantage.k"
            )
        if objective.task_reward_coef == 0 and self.rollout.drop_uniform_groups:
            raise ValueError(
                "learner.objective.task_reward_coef=0 trains on the KL terms alone, but rollout.drop_uniform_groups "
                "drops groups by their task rewards (losing their distillation signal): set "
                "rollout.drop_uniform_groups=false"
            )
        self._check_rendering()
        self._check_builtin_heads()
        # Dataset and reasoning-gym prompts are bounded by config (longer ones skipped); arithmetic's are a few tokens.
        if (
            isinstance(self.task, (DatasetTaskConfig, ReasoningGymTaskConfig))
            and self.task.max_prompt_tokens + self.rollout.max_new_tokens > self.rollout.max_model_len
        ):
            raise ValueError(
                f"task.max_prompt_tokens={self.task.max_prompt_tokens} + "
                f"rollout.max_new_tokens={self.rollout.max_new_tokens} "
                f"exceeds rollout.max_model_len={self.rollout.max_model_len}; lower one or raise max_model_len"
            )
        if self.model.path is None and self.model.max_position_embeddings < self.rollout.max_model_len:
            raise ValueError(
                f"rollout.max_model_len={self.rollout.max_model_len} exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )
        return self

    def _check_builtin_heads(self) -> None:
        m = self.model
        if m.path is not None:
            return
        if m.hidden_size % m.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={m.hidden_size} is not a multiple of "
                f"model.num_attention_heads={m.num_attention_heads}"
            )
        head_dim = m.hidden_size // m.num_attention_heads
        if self.rollout.engine == "vllm" and self.rollout.device == "cpu" and head_dim not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"model.hidden_size / model.num_attention_heads = {head_dim}, a head size vLLM's CPU attention "
                f"does not support (one of {list(VLLM_CPU_HEAD_SIZES)}): change model.num_attention_heads or "
                "model.hidden_size"
            )

    def _check_rendering(self) -> None:
        builtin_char = self.model.path is None and self.model.builtin == "char_llama"
        if builtin_char and self.render.mode == "chat":
            raise ValueError(
                "render.mode='chat' but the built-in char_llama model has no chat template: set "
                "model.builtin=bpe_qwen2 (ChatML template) or render.mode=raw"
            )
        if builtin_char and self.task.kind == "reasoning_gym":
            raise ValueError(
                "task.kind='reasoning_gym' writes English prompts that the built-in char_llama model (64 positions) "
                "cannot hold: set model.builtin=bpe_qwen2, or give model.path"
            )
        if getattr(self.task, "messages_key", None) is not None and self.render.mode != "chat":
            raise ValueError(
                f"task.messages_key={self.task.messages_key!r} gives chat turns, which render.mode='raw' cannot "
                "render: set render.mode=chat"
            )

    @property
    def synchronous(self) -> bool:
        return self.replay.max_staleness == 0


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if isinstance(node.get(k), str):  # a variant given by kind alone: `advantage: pass_at_k` + `advantage.k=2`
            node[k] = {"kind": node[k]}
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`['learner.lr=3e-4', 'run.name=x']` -> [(dotted, YAML-parsed value)]."""
    out = []
    for item in items:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value (e.g. learner.lr=3e-4)")
        out.append((key, yaml.safe_load(raw)))
    return out


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        parts = [str(x) for x in e["loc"]]
        if parts[:1] == ["task"] and parts[1:2] in (["arithmetic"], ["dataset"], ["reasoning_gym"]):
            del parts[1]  # the union's tag is not a YAML key
        loc = ".".join(parts) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling against the config reference in deploy/configs/"
        lines.append(
            f"  {loc}: {msg}"
            + (
                f" (got {e['input']!r})"
                if e["type"] not in ("extra_forbidden",) and "input" in e and not isinstance(e["input"], dict)
                else ""
            )
        )
    return "invalid run config:\n" + "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML (or none = all defaults), apply dotted overrides, validate; raise `ConfigError` on any problem."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pick one from deploy/configs/")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (run, model, task, ...)")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def check_model_path(cfg: RunConfig) -> None:
    """Raise `ConfigError` unless `model.path` (when given) is a saved HF model with a tokenizer, and
    `learner.reference.path` (when given) a saved HF model, and likewise the teacher, critic and reward model.

    Run at start-up on the machine that will load it; `--dry-run` only reports it, since a cluster
    config names a path on the cluster's nodes.
    """
    if cfg.model.path is not None:
        _check_hf_dir(
            "model.path", cfg.model.path, tokenizer=True, fix="or remove model.path to use the built-in tiny model"
        )
    if isinstance(cfg.task, DatasetTaskConfig) and not Path(cfg.task.path).expanduser().exists():
        raise ConfigError(
            f"task.path={cfg.task.path!r} does not exist; give a local JSONL or Parquet file, or a datasets "
            "save_to_disk directory"
        )
    if cfg.cold_start is not None and cfg.cold_start.solutions_path is not None:
        if not Path(cfg.cold_start.solutions_path).expanduser().is_file():
            raise ConfigError(
                f"cold_start.solutions_path={cfg.cold_start.solutions_path!r} is not a file; give a JSONL of worked "
                'solutions ({"prompt": ..., "completion": ...} per line) or remove it to train on reference answers'
            )
    if cfg.learner.reference.path is not None:
        _check_hf_dir(
            "learner.reference.path",
            cfg.learner.reference.path,
            tokenizer=False,
            fix="or remove it to use the run's starting weights as the reference",
        )
    if cfg.learner.teacher.path is not None:
        _check_hf_dir(
            "learner.teacher.path",
            cfg.learner.teacher.path,
            tokenizer=True,
            fix="(e.g. an earlier run's final_model) or set objective.kl_teacher.coef=0",
        )
    if cfg.learner.critic is not None:
        _check_hf_dir(
            "learner.critic.path",
            cfg.learner.critic.path,
            tokenizer=True,
            fix="e.g. runs/<name>/reward_model written by python -m services.train_rm, or drop learner.critic",
        )
    if cfg.reward.model is not None:
        _check_hf_dir(
            "reward.model.path",
            cfg.reward.model.path,
            tokenizer=True,
            fix="e.g. runs/<name>/reward_model written by python -m services.train_rm",
        )


def _check_hf_dir(field: str, path: str, tokenizer: bool, fix: str) -> None:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{field}={path!r} is not a directory; give a local HF model directory, {fix}")
    if not (p / "config.json").exists() or not (list(p.glob("*.safetensors")) or list(p.glob("*.bin"))):
        raise ConfigError(
            f"{field}={path!r} lacks config.json or weights (*.safetensors); it must be a directory written by "
            "save_pretrained"
        )
    if tokenizer and not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        raise ConfigError(
            f"{field}={path!r} has no tokenizer files; save the tokenizer next to the model (tokenizer.save_pretrained)"
        )


def write_resolved(cfg: RunConfig, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.json"
    out.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return out
