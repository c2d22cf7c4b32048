"""Direct preference optimisation (DPO, IPO, conservative DPO) of a causal LM against a frozen reference.

Contract:
- `sequence_logprobs(model, tb, average)` `[B]`: the sum (or, with `average`, the mean) of the completion
  tokens' log-probs, computed like the RL learner's (`learner.logprobs.completion_outputs`, temperature 1).
- `train_dpo(policy, reference, train, held_out, cfg)` runs `cfg.steps` DeepSpeed steps of
  `learner.preference_losses.dpo_loss` on pairs; the reference is a frozen copy of the starting policy
  (`ReferencePolicy`'s role, kept in eval mode, never updated) whose log-probs are computed per batch.
  IPO uses length-averaged log-probs (Azar et al. 2023); DPO and cDPO use sums (Rafailov et al. 2023).
  Held-out pairs report preference accuracy (implicit reward of chosen > rejected) and the reward margin.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from pydantic import Field

from learner.batch import Tokens
from learner.logprobs import completion_outputs
from learner.pair_training import PairTrainConfig, deepspeed_engine, pair_batches, pair_tokens
from learner.preference_losses import DPOKind, dpo_loss, pairwise_accuracy

log = logging.getLogger(__name__)


class DPOConfig(PairTrainConfig):
    kind: DPOKind = Field(
        "dpo", description="dpo (sigmoid loss), ipo (squared loss on length-averaged log-ratios) or cdpo"
    )
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL to the reference; lower = move further")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="cdpo: assumed probability that a pair's label is flipped"
    )
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate (DPO wants far lower rates than RM training)")


def sequence_logprobs(model, tb: Tokens, average: bool = False) -> torch.Tensor:
    """`[B]` summed (or mean) log-probs of each row's completion tokens."""
    logp, _, _ = completion_outputs(model, tb)
    total = (logp * tb.mask).sum(-1)
    return total / tb.mask.sum(-1).clamp(min=1) if average else total


def _pair_logprobs(model, pairs: Sequence, pad_id: int, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lp = sequence_logprobs(model, pair_tokens(pairs, pad_id), average)
    return lp[: len(pairs)], lp[len(pairs) :]


def _losses(policy, reference, pairs, pad_id: int, cfg: DPOConfig):
    average = cfg.kind == "ipo"
    pc, pr = _pair_logprobs(policy, pairs, pad_id, average)
    with torch.no_grad():
        rc, rr = _pair_logprobs(reference, pairs, pad_id, average)
    return dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.kind, cfg.label_smoothing)


@torch.no_grad()
def evaluate_dpo(policy, reference, pairs: Sequence, pad_id: int, cfg: DPOConfig) -> dict[str, float]:
    was_training = policy.training
    policy.eval()
    chosen, rejected, losses = [], [], []
    for start in range(0, len(pairs), cfg.eval_batch_pairs):
        batch = pairs[start : start + cfg.eval_batch_pairs]
        loss, c, r = _losses(policy, reference, batch, pad_id, cfg)
        chosen.append(c)
        rejected.append(r)
        losses.append(loss.item() * len(batch))
    policy.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {
        "dpo/eval_loss": sum(losses) / len(pairs),
        "dpo/eval_preference_accuracy": pairwise_accuracy(c, r),
        "dpo/eval_reward_margin": float((c - r).mean()),
    }


def train_dpo(
    policy,
    reference,
    train: Sequence,
    held_out: Sequence,
    cfg: DPOConfig,
    pad_id: int,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """DPO-family training of `policy` (a causal LM, updated in place); returns the last held-out evaluation."""
    if not train or not held_out:
        raise ValueError(f"DPO needs train and held-out pairs (got {len(train)}, {len(held_out)})")
    reference.requires_grad_(False).eval()
    engine, scheduler = deepspeed_engine(policy, cfg)
    engine.train()
    batches = pair_batches(train, cfg.pairs_per_step, cfg.seed)
    last: dict[str, float] = {}
    for step in range(1, cfg.steps + 1):
        loss, c, r = _losses(engine.module, reference, next(batches), pad_id, cfg)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"DPO loss is {loss.item()} at step {step}; lower lr")
        engine.backward(loss)
        engine.step()
        record = {
            "dpo/loss": loss.item(),
            "dpo/train_preference_accuracy": pairwise_accuracy(c, r),
            "dpo/train_reward_margin": float((c - r).mean()),
            "dpo/chosen_reward": float(c.mean()),
            "dpo/rejected_reward": float(r.mean()),
            "dpo/lr": scheduler.get_last_lr()[0],
        }
        if step % cfg.eval_every_steps == 0 or step == cfg.steps:
            last = evaluate_dpo(engine.module, reference, held_out, pad_id, cfg)
            record |= last
            log.info("dpo step %d/%d %s", step, cfg.steps, {k: round(v, 4) for k, v in record.items()})
        if on_metrics is not None:
            on_metrics(step, record)
    engine.module.eval()
    return last
