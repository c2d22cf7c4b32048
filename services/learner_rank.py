"""`LearnerRank`: one DeepSpeed rank as a Ray actor, a thin shell over `learner.step.LearnerCore`.

Rank 0 also owns the sending end of the weight broadcast. `publish` snapshots the weights (a
collective under ZeRO-3, so every rank calls it) and sends them from a background thread, so the
next training steps overlap the broadcast; a new publish first waits for the previous send.
`publish(v, group)` first re-forms the weight group (services/worker_pool.py: membership changed)
on the background thread, so joining members never block training. A broadcast that fails with
`WeightSyncError` (a member died or did not ack within timeout_s) is not raised: `publish` returns
it as the previous send's `SendOutcome`, and the owner re-forms the group with the survivors.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import ray

from learner.config import LearnerConfig
from learner.weight_transport import BroadcastTransport, SyncStats, WeightGroup, WeightSyncConfig, WeightSyncError
from services import metrics


@dataclasses.dataclass(frozen=True)
class SendOutcome:
    """How one broadcast ended on the sender: `error` is None when every member received it."""

    policy_version: int
    error: str | None = None


@ray.remote
class LearnerRank:
    def __init__(self, cfg: LearnerConfig, model_dir: str, rank: int, world_size: int):
        self.cfg, self.model_dir, self.rank, self.world_size = cfg, model_dir, rank, world_size
        self.core = None
        self.transport: BroadcastTransport | None = None
        self._sender: threading.Thread | None = None
        self._last: SyncStats | None = None
        self._outcome: SendOutcome | None = None
        self._error: BaseException | None = None

    def node_address(self) -> tuple[str, int]:
        """This actor's node IP and a free port on it (rank 0's become the group's rendezvous)."""
        from learner.weight_transport import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the DeepSpeed group (all ranks call this concurrently) and build the model + optimiser."""
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            DS_ACCELERATOR="cuda" if self.cfg.device == "cuda" else "cpu",
        )
        from learner.step import LearnerCore

        self.core = LearnerCore(self.cfg, self.model_dir, self.rank, self.world_size)
        return self.rank

    def train_step(self, batch) -> dict[str, float]:
        diag = self.core.train_step(batch)
        metrics.record_learner_step(self.rank, diag)
        return diag

    def join_weight_group(self, cfg: WeightSyncConfig, master_addr: str, master_port: int, world_size: int) -> int:
        self.transport = BroadcastTransport.create(cfg, master_addr, master_port, 0, world_size)
        return 0

    def publish(self, policy_version: int, group: WeightGroup | None = None) -> SendOutcome | None:
        """Snapshot weights now and broadcast them in the background as `policy_version`.

        With `group`, rank 0 first re-forms the weight group there (members changed). Returns how the
        previous broadcast ended (None if there was none, or on ranks > 0)."""
        previous = self.wait_published()
        weights = self.core.named_weights()
        if self.rank != 0:
            return None
        metrics.record_published(policy_version)
        self._sender = threading.Thread(target=self._send, args=(weights, policy_version, group), daemon=True)
        self._sender.start()
        return previous

    def _send(self, weights, policy_version: int, group: WeightGroup | None) -> None:
        try:
            if group is not None:
                self._regroup(group)
            if self.transport is None:  # no receivers right now
                self._outcome = SendOutcome(policy_version, "no rollout worker in the weight group")
                return
            self._last = self.transport.send(weights, policy_version)
            self._outcome = SendOutcome(policy_version)
            metrics.record_sent(self._last.seconds, self._last.bytes)
        except WeightSyncError as e:  # a member died or timed out: the owner re-forms the group
            # Drop the group now: the survivors blocked in this broadcast see their sender go and
            # fail at once, instead of each waiting out timeout_s.
            if self.transport is not None:
                self.transport.abandon()
            metrics.record_send_failed()
            self._outcome = SendOutcome(policy_version, f"{type(e).__name__}: {e}")
        except BaseException as e:  # a bug, surfaced by wait_published
            metrics.record_send_failed()
            self._error = e

    def _regroup(self, group: WeightGroup) -> None:
        old, self.transport = self.transport, None
        if old is not None:
            old.abandon()
        if group.world_size > 1:
            self.transport = BroadcastTransport.create(
                group.cfg, group.master_addr, group.master_port, 0, group.world_size
            )

    def wait_published(self) -> SendOutcome | None:
        """Block until the broadcast in flight (if any) ended; return how it ended, re-raise a bug."""
        if self._sender is not None:
            self._sender.join()
            self._sender = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        outcome, self._outcome = self._outcome, None
        return outcome

    def logprobs(self, batch):
        return self.core.logprobs(batch)

    def save(self, out_dir: str) -> str | None:
        out = self.core.save(Path(out_dir), self.model_dir)
        return None if out is None else str(out)

    def save_state(self, out_dir: str) -> float:
        """This rank's checkpoint share (collective: every rank calls it at the same learner step); returns its "
        "seconds."""
        from services.checkpoint_store import sync_tree

        t0 = time.perf_counter()
        self.core.save_state(out_dir)
        sync_tree(Path(out_dir))  # this node's writes durable before the driver commits (shared filesystems)
        return time.perf_counter() - t0

    def load_state(self, ckpt_dir: str) -> int:
        return self.core.load_state(ckpt_dir)

    def shutdown(self) -> None:
        self.wait_published()
        if self.transport is not None:
            self.transport.close()
