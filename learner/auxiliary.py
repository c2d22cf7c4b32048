"""The learner's auxiliary models: a value head on the policy's trunk, and a frozen reference policy.

Contract:
- `PolicyWithValue(policy)` wraps a HF causal LM; `forward(**inputs)` returns `PolicyValueOutput`
  with the policy's `logits [B, L, V]` and `state_values [B, L]` = a linear head on the last hidden state.
  The head sees the same trunk as the policy (one forward pass for both; the critic's gradient flows
  into the trunk, as in OpenRLHF/TRL's shared-trunk PPO). The alternative, a separate small critic
  model, halves the interference but doubles the forward passes; it is not built. The head starts at
  zero (V = 0 everywhere), so the first GAE advantages equal the discounted returns.
  `state_values` at position P-1+t is V(s_t), the state before completion token t is sampled, aligned
  with the logits that predict token t (`learner.batch.completion_slice`).
- `ReferencePolicy(model_dir, device, offload)` is a frozen copy of the starting policy (the
  cold-start checkpoint or `model.path` unless `learner.reference.path` says otherwise); no grad, eval
  mode, never updated, never broadcast. Every rank holds a full copy (it is not ZeRO-partitioned).
  With `offload`, its weights live in CPU memory and move to the learner's device only for its
  forward pass, then back (memory for speed, like OpenRLHF's `ref_offload`); on a CPU learner
  offload changes nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from learner.batch import TrainBatch, completion_logprobs


@dataclasses.dataclass
class PolicyValueOutput:
    logits: torch.Tensor  # [B, L, V]
    state_values: torch.Tensor  # [B, L]


class PolicyWithValue(torch.nn.Module):
    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, **inputs) -> PolicyValueOutput:
        out = self.policy(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        return PolicyValueOutput(
            logits=out.logits, state_values=self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        )


class ReferencePolicy:
    def __init__(self, model_dir: str | Path, device: torch.device, offload: bool = False):
        from transformers import AutoModelForCausalLM

        self.device, self.offload = device, offload and device.type != "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.requires_grad_(False).eval()
        self.model.to("cpu" if self.offload else device)

    @torch.no_grad()
    def logprobs(self, tb: TrainBatch, temperature: float) -> torch.Tensor:
        """Reference log-probs `[B, T]` of the batch's completions, on the batch's device."""
        if self.offload:
            self.model.to(self.device)
        try:
            logp, _ = completion_logprobs(self.model, tb, temperature)
        finally:
            if self.offload:
                self.model.to("cpu")
        return logp.detach()
