"""One process's random state — python `random`, numpy's global generator, torch (CPU, and CUDA when present).

Contract: `restore_rng(capture_rng())` makes every later draw from the three generators equal to the
draws that followed the capture. The record is plain picklable data (`torch.save`s as one file).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
