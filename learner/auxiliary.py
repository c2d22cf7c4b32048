"""The learner's frozen reference policy (the value head lives with the policy: `learner.logprobs.CompletionModel`).

Contract: `ReferencePolicy(model_dir, device, offload, dtype, chunk_tokens)` is a frozen copy of the
starting policy (the cold-start checkpoint or `model.path` unless `learner.reference.path` says
otherwise), held in the learner's compute dtype; no grad, eval mode, never updated, never broadcast.
Every rank holds a full copy (it is not ZeRO-partitioned). With `offload`, its weights live in CPU
memory and move to the learner's device only for its forward pass, then back (memory for speed, like
OpenRLHF's `ref_offload`); on a CPU learner offload changes nothing. Its log-probs are computed like the
policy's (`learner.logprobs`: completion positions only, vocabulary chunks), in micro-batches.
"""

from __future__ import annotations

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
