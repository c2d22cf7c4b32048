"""Greedy pass@1 evaluation of an HF causal LM in-process (pure torch + transformers), and left padding.

Contract:
- `greedy_accuracy(model, renderer, problems, max_new_tokens, score)` renders each problem with the
  run's `rollout.render.Renderer` (the ids every engine sees), decodes greedily (argmax), batched with
  left padding, stops a row at a stop token of the renderer (or after `max_new_tokens`; stop strings cut
  the text), reads the completion with `renderer.completion_text` and scores it with `score` (the task's
  verifier, or the user's reward function). A problem counts as correct when its score is >= 1. Decoding
  uses the model's KV cache by default (`use_cache=False` for a model without one). A
  completion that runs out of budget is scored as whatever text it produced. Returns the fraction correct.
- Rollout workers evaluate through their engine instead (services/rollout_worker.py); this path serves
  in-process callers (benchmarks, the cold-start probe) with the same rendering and verifier.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from rollout.problem import Problem

CORRECT = 1.0 - 1e-9  # a score at or above this counts as a correct answer (verifiers may give partial credit)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows. Returns `input_ids [B, T]` and `attention_mask [B, T]` (1 = real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    stop_ids: Collection[int],
    pad_id: int,
    max_new_tokens: int,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy completions (the stop token, when reached, included) for each prompt; one batch.

    With `use_cache` (an HF model) each step feeds only the new token and the model's KV cache, as HF
    `generate` does: a competent user's greedy eval, O(T) per step instead of O(T²). Without it every step
    recomputes the whole prefix (for models without a cache). Either way positions are `cumsum(mask) - 1`,
    identical to the unpadded run, and a finished row is fed pads with mask 0 (its outputs are ignored).
    """
    ids, mask = left_pad(prompt_ids, pad_id)
    stop = torch.tensor(sorted(stop_ids) or [-1])
    done = torch.zeros(len(prompt_ids), dtype=torch.bool)
    out: list[list[int]] = [[] for _ in prompt_ids]
    step_ids, past = ids, None
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if use_cache:
            res = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=positions[:, -step_ids.shape[1] :],
                past_key_values=past,
                use_cache=True,
            )
            past = res.past_key_values
        else:
            res = model(input_ids=ids, attention_mask=mask, position_ids=positions)
        nxt = res.logits[:, -1, :].argmax(-1)
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(nxt[i].item())
        done |= torch.isin(nxt, stop)
        if done.all():
            break
        step_ids = torch.where(done, pad_id, nxt)[:, None]
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
    return out


def greedy_accuracy(
    model,
    renderer,
    problems: Sequence[Problem],
    max_new_tokens: int,
    score: Callable[[Problem, str], float],
    batch_size: int = 256,
    use_cache: bool = True,
) -> float:
    """Greedy pass@1 of `model` on `problems` (fraction whose score is >= 1); `use_cache`: see `greedy_generate`."""
    if not problems:
        raise ValueError("greedy_accuracy got no problems; pass a non-empty list (e.g. task.eval_set())")
    was_training = model.training
    model.eval()
    pad = renderer.tokenizer.pad_token_id
    pad = pad if pad is not None else min(renderer.stop.token_ids)
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [renderer.encode_prompt(p) for p in chunk]
        completions = greedy_generate(model, prompts, renderer.stop.token_ids, pad, max_new_tokens, use_cache)
        correct += sum(score(p, renderer.completion_text(c)) >= CORRECT for p, c in zip(chunk, completions))
    model.train(was_training)
    return correct / len(problems)
