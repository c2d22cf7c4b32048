"""Shared fixtures of the learner tests."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="module")
def dist_env():
    """The environment a one-process DeepSpeed group reads (rank 0 of 1, CPU accelerator, a free port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        DS_ACCELERATOR="cpu",
    )
    yield
