"""Reward models: a causal-LM trunk with a scalar head, trained on preference pairs with Bradley–Terry.

Contract:
- `init_reward_model(policy_dir)` loads `AutoModelForSequenceClassification` with `num_labels=1` from a
  causal-LM directory: the trunk's weights are reused, the `score` head is new (the InstructGPT recipe:
  the RM starts from the SFT model). `save_reward_model` writes a standard HF checkpoint (config with
  `num_labels=1` and `pad_token_id`, safetensors, tokenizer) that `AutoModelForSequenceClassification`
  loads back with no code of ours.
- `sequence_scores(model, tb)` `[B]`: the head applied to the hidden state of each row's last attended token
  (the final completion token). HF's own forward pools at the last non-pad token, which is the same token
  whenever the pad id does not end the completion; we pool by the attention mask so it never depends on it.
- `train_reward_model` runs `PairTrainConfig.steps` DeepSpeed steps of `bradley_terry_loss` (fewer when
  `max_wall_s` runs out first) and evaluates the held-out pairs (pairwise accuracy, mean reward gap) every
  `eval_every_steps` and at the end.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import Field

from learner.batch import Tokens
from learner.pair_training import PairTrainConfig, deepspeed_engine, pair_batches, pair_tokens
from learner.preference_losses import bradley_terry_loss, pairwise_accuracy

log = logging.getLogger(__name__)


class RewardModelTrainConfig(PairTrainConfig):
    margin: bool = Field(
        False, description="subtract each pair's margin (preference strength) inside the Bradley–Terry sigmoid"
    )
    magnitude_coef: float = Field(
        1e-3, ge=0, description="weight of mean(r²) keeping rewards near zero; BT alone fixes only differences"
    )
    max_wall_s: float | None = Field(
        None,
        gt=0,
        description="stop after the step that passes this many seconds of training (evaluating the held-out pairs "
        "then), even before `steps`; set it when training shares a time budget (a benchmark, a CI job)",
    )
    verified_only: bool = Field(
        False,
        description="train and evaluate only on verified pairs: chosen accepted by the task's verifier, rejected "
        "not (needs the data's answer column); turn on when the data mixes in pairs ranked by a graded or "
        "noisy score, e.g. wrong-vs-wrong pairs of sampled completions",
    )


def init_reward_model(model_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A sequence-classification model (`num_labels=1`) from a causal-LM or reward-model directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=dtype)
    if model.config.pad_token_id is None:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model


def save_reward_model(model, tokenizer_dir: str | Path, out_dir: str | Path) -> Path:
    """A standard HF checkpoint (weights, config, tokenizer) loadable by AutoModelForSequenceClassification."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)
    return out


def sequence_scores(model, tb: Tokens) -> torch.Tensor:
    """Scalar reward `[B]` of each sequence, read at its last attended position."""
    trunk = getattr(model, model.base_model_prefix)
    hidden = trunk(
        input_ids=tb.input_ids, attention_mask=tb.attention_mask, position_ids=tb.position_ids, use_cache=False
    ).last_hidden_state
    last = tb.input_ids.shape[1] - 1 - tb.attention_mask.flip(dims=[1]).argmax(dim=1)
    pooled = hidden[torch.arange(hidden.shape[0]), last]
    return model.score(pooled.to(model.score.weight.dtype)).squeeze(-1).float()


def pad_id_of(model) -> int:
    return int(model.config.pad_token_id or 0)


def pair_rewards(model, pairs: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards `[B]`, rejected rewards `[B]`) in one forward pass."""
    scores = sequence_scores(model, pair_tokens(pairs, pad_id_of(model)))
    return scores[: len(pairs)], scores[len(pairs) :]


@torch.no_grad()
def evaluate_reward_model(model, pairs: Sequence, batch_pairs: int = 64) -> dict[str, float]:
    """Held-out pairwise accuracy, mean reward gap (chosen − rejected) and mean rewards."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_pairs):
        c, r = pair_rewards(model, pairs[start : start + batch_pairs])
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {
        "rm/eval_pairwise_accuracy": pairwise_accuracy(c, r),
        "rm/eval_reward_gap": float((c - r).mean()),
        "rm/eval_chosen_reward": float(c.mean()),
        "rm/eval_rejected_reward": float(r.mean()),
    }


def _train_step(engine, scheduler, pairs: Sequence, cfg: RewardModelTrainConfig) -> dict[str, float]:
    c, r = pair_rewards(engine.module, pairs)
    margin = torch.tensor([p.margin for p in pairs]) if cfg.margin else 0.0
    loss = bradley_terry_loss(c, r, margin, cfg.magnitude_coef)
    engine.backward(loss)
    engine.step()
    return {
        "rm/loss": loss.item(),
        "rm/train_pairwise_accuracy": pairwise_accuracy(c.detach(), r.detach()),
        "rm/train_reward_gap": float((c - r).detach().mean()),
        "rm/lr": scheduler.get_last_lr()[0],
    }


def train_reward_model(
    model,
    train: Sequence,
    held_out: Sequence,
    cfg: RewardModelTrainConfig,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Bradley–Terry training on `train` pairs; returns the last held-out evaluation (see module docstring)."""
    if not train or not held_out:
        raise ValueError(f"reward-model training needs train and held-out pairs (got {len(train)}, {len(held_out)})")
    engine, scheduler = deepspeed_engine(model, cfg)
    engine.train()
    batches = pair_batches(train, cfg.pairs_per_step, cfg.seed)
    last_eval: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        record = _train_step(engine, scheduler, next(batches), cfg)
        if not math.isfinite(record["rm/loss"]):
            raise FloatingPointError(f"reward-model loss is {record['rm/loss']} at step {step}; lower lr")
        out_of_time = cfg.max_wall_s is not None and time.perf_counter() - t0 >= cfg.max_wall_s
        if step % cfg.eval_every_steps == 0 or step == cfg.steps or out_of_time:
            last_eval = evaluate_reward_model(engine.module, held_out, cfg.eval_batch_pairs)
            record |= last_eval
            log.info("rm step %d/%d %s", step, cfg.steps, {k: round(v, 4) for k, v in record.items()})
        record["rm/elapsed_s"] = time.perf_counter() - t0
        if on_metrics is not None:
            on_metrics(step, record)
        if out_of_time:
            log.info("rm training stopped at step %d/%d: rm_training.max_wall_s=%s", step, cfg.steps, cfg.max_wall_s)
            break
    engine.module.eval()
    return last_eval
