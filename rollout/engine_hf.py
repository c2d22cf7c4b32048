"""`HFEngine`: the `Engine` protocol on a plain transformers causal LM (fallback and test double).

Contract: as `rollout/engine.py`. All prompts x n samples decode as one left-padded batch with a KV
cache; sampling draws from `softmax(logits / temperature)` restricted to the top-p nucleus with a
seeded `torch.Generator`, and the returned logprob is that (renormalised) distribution's log-prob
of the drawn token. A row stops at a token in `stop.token_ids`, or at the token whose decoded text
(the row's completion so far, without special tokens) first contains a stop string, as vLLM's
detokenizer decides; that token is kept with its logprob.
Same `seed` and inputs give the same completions. Without a seed, draws continue one generator
seeded with `RolloutConfig.seed` at construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from rollout.config import RolloutConfig
from rollout.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    check_max_model_len,
    check_prompts,
    checked_weights,
    default_stop,
)
from rollout.evaluation import left_pad
from rollout.render import StopConditions

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the sampling distribution. `logits [B, V]` -> `[B, V]` (-inf outside the nucleus).

    Top-p keeps the smallest prefix of tokens (by descending prob) whose mass reaches `top_p`,
    always at least the most likely token, then renormalises (as vLLM's processed_logprobs).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    mass_before = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp()
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


class HFEngine:
    def __init__(self, cfg: RolloutConfig, model_dir: str | Path, stop: StopConditions | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.model_dir = cfg, Path(model_dir)
        self.device = torch.device(cfg.device)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_DTYPES[cfg.dtype])
        self.model.to(self.device).eval()
        check_max_model_len(cfg, self.model.config.max_position_embeddings)
        self.stop = stop or default_stop(model_dir)
        self.eos_ids = self.stop.token_ids
        self._eos_tensor = torch.tensor(sorted(self.eos_ids) or [-1], device=self.device)
        # Stop strings are matched on decoded text, so only then is the tokenizer needed.
        self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir)) if self.stop.strings else None
        pad = self.model.config.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids or {0})
        self.vocab_size = self.model.config.vocab_size
        self.policy_version = 0
        self._generator = torch.Generator(self.device).manual_seed(cfg.seed)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, seed: int | None = None) -> list[list[Completion]]:
        if n < 1:
            raise ValueError(f"n={n}: ask for at least one completion per prompt")
        gen = self._generator if seed is None else torch.Generator(self.device).manual_seed(seed)
        rows = [p for p in prompts for _ in range(n)]
        flat = self._decode(prompts, rows, gen, self.cfg.max_new_tokens)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def greedy(self, prompts: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
        return [c.token_ids for c in self._decode(prompts, list(prompts), None, self.cfg.max_new_tokens)]

    @torch.no_grad()
    def teacher_forced_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        check_prompts([prompt_ids], self.vocab_size, self.cfg.max_model_len - len(completion_ids))
        ids = torch.tensor([list(prompt_ids) + list(completion_ids)], device=self.device)
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, ids[0, len(prompt_ids) :, None]).squeeze(-1).tolist()

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> None:
        """Copy each tensor into the live weights as it arrives (cast to the engine's dtype, checked first)."""
        params = self.model.state_dict()
        for name, tensor in checked_weights(named_tensors, {k: tuple(v.shape) for k, v in params.items()}):
            params[name].copy_(tensor)
        self.policy_version = policy_version

    def reload_initial_weights(self) -> None:
        """The starting weights from the model directory (after an update that failed midway)."""
        from safetensors.torch import load_file

        for path in sorted(self.model_dir.glob("*.safetensors")):
            self.load_weights(load_file(str(path)).items(), 0)
        self.policy_version = 0

    def shutdown(self) -> None:
        self.model = None

    @torch.no_grad()
    def _decode(self, prompts, rows, gen: torch.Generator | None, max_new: int) -> list[Completion]:
        """Decode `rows` (one token-id list per output) together; `gen=None` means greedy."""
        check_prompts(prompts, self.vocab_size, self.cfg.max_model_len - max_new)
        ids, mask = (t.to(self.device) for t in left_pad(rows, self.pad_id))
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        ends = [None] * len(rows)  # row -> completion length when it stopped
        tokens, logprobs = [], []
        for step in range(max_new):
            tok, lp = self._pick(out.logits[:, -1], gen)
            tokens.append(tok)
            logprobs.append(lp)
            stopped = (torch.isin(tok, self._eos_tensor) | self._hit_stop_string(tokens, done)) & ~done
            for i in stopped.nonzero().flatten().tolist():
                ends[i] = step + 1
            done |= stopped
            if bool(done.all()) or step == max_new - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            pos = pos[:, -1:] + 1
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        toks, lps = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()
        return [
            Completion(
                tuple(t[: end or len(t)]), tuple(lp[: end or len(t)]), FINISH_LENGTH if end is None else FINISH_STOP
            )
            for t, lp, end in zip(toks, lps, ends)
        ]

    def _pick(self, logits: torch.Tensor, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row. `logits [B, V]` -> `(token [B], logprob [B])`."""
        if gen is None:
            logp = torch.log_softmax(logits.float(), dim=-1)
            tok = logp.argmax(dim=-1)
        else:
            logp = sampling_logprobs(logits, self.cfg.temperature, self.cfg.top_p)
            tok = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    def _hit_stop_string(self, tokens: list[torch.Tensor], done: torch.Tensor) -> torch.Tensor:
        """`[B]` bool: rows not yet done whose decoded completion now contains a stop string."""
        hit = torch.zeros_like(done)
        if not self.stop.strings:
            return hit
        for i in (~done).nonzero().flatten().tolist():
            text = self._tokenizer.decode([int(t[i]) for t in tokens], skip_special_tokens=True)
            hit[i] = any(s in text for s in self.stop.strings)
        return hit
