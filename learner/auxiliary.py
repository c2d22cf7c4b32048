"""The learner's frozen policies: the reference, the kl_prev snapshot, the distillation teacher.

(The value head lives with the policy: `learner.logprobs.CompletionModel`.)

Contract: `ReferencePolicy(model_dir, device, offload, dtype, chunk_tokens)` is a frozen copy of the
starting policy (the cold-start checkpoint or `model.path` unless `learner.reference.path` says
otherwise), held in the learner's compute dtype; no grad, eval mode, never updated, never broadcast.
Every rank holds a full copy (it is not ZeRO-partitioned). With `offload`, its weights live in CPU
memory and move to the learner's device only for its forward pass, then back (memory for speed, like
OpenRLHF's `ref_offload`); on a CPU learner offload changes nothing. Its log-probs are computed like the
policy's (`learner.logprobs`: completion positions only, vocabulary chunks), in micro-batches.
The same class serves the kl_prev snapshot (`load_from` overwrites it with the policy's current weights,
every rank, so it is the one frozen model that changes) and the distillation teacher (any local HF model
with the student's tokenizer, `check_same_tokenizer`). Memory: each is one more full model per rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from learner.batch import Tokens
from learner.logprobs import completion_outputs


class ReferencePolicy:
    def __init__(
        self,
        model_dir: str | Path,
        device: torch.device,
        offload: bool = False,
        dtype: torch.dtype = torch.float32,
        chunk_tokens: int = 1024,
    ):
        from transformers import AutoModelForCausalLM

        self.device, self.offload, self.chunk_tokens = device, offload and device.type != "cpu", chunk_tokens
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        self.model.requires_grad_(False).eval()
        self.model.to("cpu" if self.offload else device)

    @torch.no_grad()
    def logprobs(self, parts: list[Tokens], temperature: float) -> list[torch.Tensor]:
        """Reference log-probs `[b, t]` of each part's completions, on the parts' device."""
        if self.offload:
            self.model.to(self.device)
        try:
            return [completion_outputs(self.model, tb, temperature, self.chunk_tokens)[0] for tb in parts]
        finally:
            if self.offload:
                self.model.to("cpu")

    @torch.no_grad()
    def load_from(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Overwrite the weights with the policy's `(HF name, tensor)` pairs (a refreshed snapshot)."""
        params = dict(self.model.named_parameters())
        missing = set(params)
        for name, tensor in named:
            if name not in params:
                raise KeyError(f"snapshot has no parameter {name!r}; the policy and its snapshot must share a config")
            params[name].copy_(tensor)
            missing.discard(name)
        if missing:
            raise KeyError(f"snapshot refresh left {sorted(missing)[:3]}... unset; the policy sent too few tensors")


def check_same_tokenizer(
    policy_dir: str | Path,
    other_dir: str | Path,
    field: str = "learner.teacher.path",
    policy: str = "student's",
    why: str = "on-policy distillation needs the same token ids",
    fix: str = "Use a teacher trained from the same base tokenizer (e.g. an earlier run's final_model)",
) -> None:
    """Raise unless the model at `other_dir` (`field`) tokenises exactly like the policy: a teacher's token-level
    KL and a critic's values read the policy's ids, so a different vocabulary would score other tokens
    (cross-tokenizer distillation is not done)."""
    from transformers import AutoTokenizer

    s, t = AutoTokenizer.from_pretrained(str(policy_dir)), AutoTokenizer.from_pretrained(str(other_dir))
    if s.get_vocab() != t.get_vocab() or s.all_special_ids != t.all_special_ids:
        raise ValueError(
            f"{field}={str(other_dir)!r} has a different tokenizer from the {policy} ({policy_dir}): "
            f"vocab sizes {len(t)} vs {len(s)}; {why}. {fix}"
        )


def frozen_policies(cfg, model_dir: str | Path, device: torch.device, needs: set[str]) -> dict[str, ReferencePolicy]:
    """The frozen models `needs` asks for, by the objective input they fill: the reference, the kl_prev snapshot
    (starting as the run's initial weights, refreshed by the learner) and the distillation teacher."""
    dtype, chunk = cfg.compute_dtype, cfg.logprob_chunk_tokens
    out = {}
    if "ref_logprobs" in needs:
        path = cfg.reference.path or model_dir
        out["ref_logprobs"] = ReferencePolicy(path, device, cfg.reference.offload, dtype, chunk)
    if "prev_logprobs" in needs and cfg.objective.kl_prev.source == "snapshot":
        out["prev_logprobs"] = ReferencePolicy(model_dir, device, cfg.objective.kl_prev.offload, dtype, chunk)
    if "teacher_logprobs" in needs:
        check_same_tokenizer(model_dir, cfg.teacher.path)
        out["teacher_logprobs"] = ReferencePolicy(cfg.teacher.path, device, cfg.teacher.offload, dtype, chunk)
    return out
