"""`LearnerRank`: one DeepSpeed rank as a Ray actor, a thin shell over `learner.step.LearnerCore`.

Rank 0 also owns the sending end of the weight broadcast. Every rank calls `publish` (under ZeRO-3 the
weights are gathered bucket by bucket, a collective). Two modes (`learner.weight_sync.snapshot`):
- snapshot (default unless ZeRO-3): rank 0 packs the weights into wire-dtype buckets on its device
  (buffers reused across publishes) and sends them from a background thread, so the next training steps
  overlap the broadcast; a new publish first waits for the previous send. `publish(v, group)` re-forms
  the weight group (services/worker_pool.py: membership changed) on that thread too, so joining members
  never block training.
- stream: buckets go straight from the parameters (ZeRO-3: gathered one bucket at a time, never the
  whole model on rank 0) while training waits for the send, regrouping included.
A broadcast that fails with `WeightSyncError` (a member died, or did not get ready / ack within
timeout_s) is not raised: `publish` returns it as the previous send's `SendOutcome`, and the owner
re-forms the group with the survivors. `abandon_weight_group` drops the group at once when the owner
learns a member died, so a broadcast waiting for that member fails now instead of after timeout_s.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import ray

from learner.config import LearnerConfig
from learner.diagnostics import StepDiagnostics
from learner.weight_packing import PackedBucket
from learner.weight_transport import (
    BroadcastTransport,
    SyncStats,
    WeightGroup,
    WeightSyncConfig,
    WeightSyncError,
    WeightSyncTimeout,
    snapshot_update,
)
from replay.parts import RankPart, join_parts
from services import metrics


@dataclasses.dataclass(frozen=True)
class SendOutcome:
    """How one broadcast ended on the sender: `error` is None when every member received it."""

    policy_version: int
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class RankStepResult:
    """What one rank's `train_step` reports: diagnostics (each field declares how it reduces over ranks,
    `learner.diagnostics`) and a sampling priority per trained group (learner/sample_weights.py) for replay's
    prioritized sampler."""

    diagnostics: StepDiagnostics
    group_ids: tuple[str, ...]
    priorities: tuple[float, ...]
    skipped_trace_ids: tuple[str, ...] = ()  # only when the step was skipped for NaN/inf (logged by the loop)


# `abandon_weight_group` runs on its own thread: the owner calls it when a member died, typically while
# rank 0 is blocked in `publish` waiting for the previous send to that member (a one-thread actor would
# queue the abandon behind it and stall training for the whole weight_sync.timeout_s).
@ray.remote(concurrency_groups={"control": 1})
class LearnerRank:
    def __init__(self, cfg: LearnerConfig, model_dir: str, rank: int, world_size: int):
        self.cfg, self.model_dir, self.rank, self.world_size = cfg, model_dir, rank, world_size
        self.core = None
        self.transport: BroadcastTransport | None = None
        self._sender: threading.Thread | None = None
        self._last: SyncStats | None = None
        self._outcome: SendOutcome | None = None
        self._error: BaseException | None = None
        self._snapshot: list[PackedBucket] | None = None  # rank 0: snapshot buffers, reused by every publish
        self._snapshot_version = 0
        self._groups_formed = 0  # weight groups rank 0 formed (start-up join + each regroup), see abandon

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

    def train_step(self, *parts: RankPart | pa.Table) -> RankStepResult:
        """One step on this rank's groups: `RankPart`s (from replay, passed as refs so Ray resolves them
        here straight from the shards' object stores), or a plain TRACE_SCHEMA table (weights 1)."""
        if all(isinstance(p, RankPart) for p in parts):
            part = join_parts(list(parts))
            traces, diag = part.traces, self.core.train_step(part.traces, part.group_weights)
        else:
            traces = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
            diag = self.core.train_step(traces)
        metrics.record_learner_step(self.rank, diag)
        gids, priorities = self.core.last_priorities
        skipped = tuple(traces.column("trace_id").to_pylist()) if diag.skipped_nonfinite else ()
        return RankStepResult(diag, gids, priorities, skipped)

    def join_weight_group(self, cfg: WeightSyncConfig, master_addr: str, master_port: int, world_size: int) -> int:
        self.transport = BroadcastTransport.create(cfg, master_addr, master_port, 0, world_size)
        self._groups_formed = 1  # the start-up group is the first, however many rendezvous it took
        return 0

    def publish(self, policy_version: int, group: WeightGroup | None = None) -> SendOutcome | None:
        """Broadcast the current weights as `policy_version` (module docstring: snapshot or stream).

        With `group`, rank 0 first re-forms the weight group there (members changed). Returns how the
        previous broadcast ended (None if there was none, or on ranks > 0)."""
        previous = self.wait_published()
        ws = self.cfg.weight_sync
        buckets = self.core.weight_buckets(ws.bucket_bytes, ws.wire_dtype)
        if self.rank != 0:
            for _ in buckets:  # ZeRO-3: each bucket is a gather every rank joins
                pass
            return None
        t0 = time.perf_counter()
        metrics.record_published(policy_version)
        if self.cfg.snapshot_weights:
            update = snapshot_update(buckets, ws.wire_dtype, self.core.engine.device, self._snapshot)
            self._snapshot, self._snapshot_version = update.buckets, policy_version

            def send(transport: BroadcastTransport) -> SyncStats:
                return transport.send_packed(update, policy_version)

            self._sender = threading.Thread(target=self._send, args=(send, policy_version, group), daemon=True)
            self._sender.start()
        else:
            self._send(lambda transport: transport.send_buckets(buckets, policy_version), policy_version, group)
            for _ in buckets:  # a send that stopped early (no receivers, failure) leaves ZeRO-3 gathers to finish
                pass
        metrics.record_publish_blocked(time.perf_counter() - t0)
        return previous

    def _send(self, send, policy_version: int, group: WeightGroup | None) -> None:
        try:
            if group is not None:
                self._regroup(group)
            if self.transport is None:  # no receivers right now
                self._outcome = SendOutcome(policy_version, "no rollout worker in the weight group")
                return
            self._last = send(self.transport)
            self._outcome = SendOutcome(policy_version)
            metrics.record_sent(self._last.seconds, self._last.bytes)
        except WeightSyncError as e:  # a member died or timed out: the owner re-forms the group
            if isinstance(e, WeightSyncTimeout):
                metrics.record_sync_timeout("sender")
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
        self._groups_formed += 1
        old, self.transport = self.transport, None
        if old is not None:
            old.abandon()
        if group.world_size > 1:
            self.transport = BroadcastTransport.create(
                group.cfg, group.master_addr, group.master_port, 0, group.world_size
            )

    def published_weights(self) -> tuple[int, list[PackedBucket]] | None:
        """Rank 0, snapshot mode: (the last published version, its packed snapshot on the CPU) for the dedicated
        eval worker, which gets it from the object store; None before the first publish. One model of wire
        bytes per call, so call it per evaluation, not per update. Runs between publishes (this actor's
        calls are sequential), so the snapshot is not being repacked meanwhile."""
        if self._snapshot is None:
            return None
        return self._snapshot_version, [PackedBucket(b.wire.cpu(), b.header_nbytes) for b in self._snapshot]

    @ray.method(concurrency_group="control")
    def abandon_weight_group(self, groups_formed: int | None = None) -> None:
        """A member died: drop the group now, so a broadcast waiting for it fails at once (the owner re-forms it).

        `groups_formed`: how many groups the owner had planned when it learnt of the death. This call runs
        beside the others, so it may arrive after a regroup planned later, whose group does not hold the dead
        member: that one is kept."""
        if groups_formed is not None and self._groups_formed > groups_formed:
            return
        if self.transport is not None:
            self.transport.abandon()

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

    def logprobs(self, batch, at: str = "served"):
        return self.core.logprobs(batch, at)

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
