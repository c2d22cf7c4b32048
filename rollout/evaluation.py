"""Prompt encoding and greedy pass@1 evaluation on an HF causal LM (pure torch + transformers).

Contract:
- `encode_prompt(tokenizer, prompt)` is THE prompt encoding of the project: `[<bos>] + one id per
  character`. Every engine (vLLM, HF, the SFT cold start, the TRL baseline) feeds the model exactly
  these ids, so a model trained by one component is evaluated on the same inputs by another.
- `greedy_accuracy(model, tokenizer, problems, max_new_tokens)` decodes greedily (argmax), batched with
  left padding, stops a row at `<eos>` (or after `max_new_tokens`), decodes the completion without
  special tokens and scores it with the task verifier (exact match after stripping). A completion that
  runs out of budget is scored as whatever text it produced. Returns the mean score in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rollout.tasks import ArithmeticTask, Problem


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """`<bos>` followed by the prompt's characters; raises if a character is not in the vocabulary."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    unknown = [ch for ch, i in zip(prompt, ids) if i == tokenizer.unk_token_id]
    if len(ids) != len(prompt) or unknown:
        raise ValueError(
            f"prompt {prompt!r} has characters {unknown or 'that'} outside the tokenizer's alphabet; "
            "build the tokenizer with the task's alphabet (learner.tiny_model.build_tokenizer(task.alphabet))"
        )
    return [tokenizer.bos_token_id, *ids]


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
    model, prompt_ids: Sequence[Sequence[int]], eos_id: int, pad_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy completions (without the trailing `<eos>`) for each prompt; one batch, no KV cache.

    Sequences here are tens of tokens, so recomputing the prefix each step costs little and keeps the
    padding logic obviously right: positions are `cumsum(mask) - 1`, identical to the unpadded run.
    """
    ids, mask = left_pad(prompt_ids, pad_id)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool)
    out: list[list[int]] = [[] for _ in prompt_ids]
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1, :]
        nxt = logits.argmax(-1)
        for i in (~done).nonzero().flatten().tolist():
            if nxt[i].item() != eos_id:
                out[i].append(nxt[i].item())
        done |= nxt == eos_id
        if done.all():
            break
        ids = torch.cat([ids, torch.where(done, pad_id, nxt)[:, None]], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
    return out


def greedy_accuracy(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int, batch_size: int = 256) -> float:
    """Greedy pass@1 of `model` on `problems` (fraction scored 1.0 by the verifier)."""
    if not problems:
        raise ValueError("greedy_accuracy got no problems; pass a non-empty list (e.g. task.eval_set())")
    was_training = model.training
    model.eval()
    correct = 0.0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [encode_prompt(tokenizer, p.prompt) for p in chunk]
        completions = greedy_generate(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new_tokens)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        correct += sum(ArithmeticTask.score(p, t) for p, t in zip(chunk, texts))
    model.train(was_training)
    return correct / len(problems)
