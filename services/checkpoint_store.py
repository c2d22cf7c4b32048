"""The checkpoint directory protocol (no Ray): write, sync, commit atomically, keep the last K, prune replay.

Layout under `runs/<name>/checkpoints/`:
    step-000300/          one complete checkpoint; it only ever appears by a rename of a synced temp dir
    step-000300.1/        the same learner step saved again (e.g. the clean-stop save right after a periodic
                          one): a new name, so the directory `latest` names is never removed to make room
    latest                the name of the newest complete checkpoint, replaced atomically
    .tmp-step-000300/     a checkpoint being written (a crash leaves it; the next `begin` removes it)

Invariant: at every instant `latest` names a complete checkpoint (or does not exist yet). `commit`:
(1) write loop.json into the temp dir, fsync every file and directory in it; (2) rename it to a name
no directory has; fsync the parent; (3) write `latest` to a temp file, fsync, rename over `latest`,
fsync the parent; (4) only then delete what is no longer kept: checkpoints beyond the newest
`keep` (never the one `latest` names), then the replay files no kept checkpoint needs (each kept
checkpoint needs its replay snapshot and every journal segment after it; `replay.segments.prune`).
A crash between any two steps leaves `latest` on a complete checkpoint, the old or the new one.

`replay_cursors` reads back, from the replay segments of a checkpoint's shards, how far each prompt
stream got into replay (the "origin" rollout workers stamp into trace metadata): with
the cursors saved in loop.json this is the whole resume state of the prompt streams.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

from replay.journal import fsync_dir, read_journal
from replay.schema import TRACE_SCHEMA
from replay.segments import prune, read_sealed, snapshot_index
from services.config import ConfigError

LATEST = "latest"
_STEP = re.compile(r"^step-(\d+)(?:\.(\d+))?$")


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint to continue from."""

    path: Path
    state: dict  # loop.json

    @property
    def learner_step(self) -> int:
        return self.state["learner_step"]


def sync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (directories after their entries)."""
    for here, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(here))


def _order(path: Path) -> tuple[int, int]:
    m = _STEP.match(path.name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (-1, -1)


class CheckpointStore:
    """The directory protocol of the module docstring."""

    def __init__(self, run_dir: Path, keep: int, prune_traces: bool = False):
        self.root, self.keep, self.prune_traces = Path(run_dir) / "checkpoints", keep, prune_traces

    def begin(self, learner_step: int) -> Path:
        for stale in self.root.glob(".tmp-step-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-step-{learner_step:06d}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, state: dict) -> Path:
        """Steps (1)-(4) of the module docstring; returns the committed checkpoint's directory."""
        (tmp / "loop.json").write_text(json.dumps(state))
        sync_tree(tmp)
        final = self._free_name(tmp.name.removeprefix(".tmp-"))
        os.replace(tmp, final)
        fsync_dir(self.root)
        pointer = self.root / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        with open(pointer, "rb") as f:
            os.fsync(f.fileno())
        os.replace(pointer, self.root / LATEST)
        fsync_dir(self.root)
        self._prune(final)
        return final

    def _free_name(self, base: str) -> Path:
        """`base`, or past every copy of that step already there: names of one step sort in save order."""
        copies = [_order(p) for p in self.root.glob(f"{base}*") if _order(p)[0] == _order(Path(base))[0]]
        return self.root / (f"{base}.{max(n for _, n in copies) + 1}" if copies else base)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return sorted((p for p in self.root.glob("step-*") if (p / "loop.json").exists()), key=_order)

    def _prune(self, latest: Path) -> None:
        newest_per_step = {_order(p)[0]: p for p in self.complete()}  # a re-saved step supersedes its older copy
        kept = set(list(newest_per_step.values())[-self.keep :]) | {latest}
        for old in self.root.glob("step-*"):
            if old not in kept:
                shutil.rmtree(old, ignore_errors=True)
        fsync_dir(self.root)
        self._prune_replay(sorted(kept, key=_order))

    def _prune_replay(self, kept: list[Path]) -> None:
        """Delete replay snapshots and journal segments older than every kept checkpoint's snapshot."""
        oldest: dict[Path, int] = {}
        for ckpt in kept:
            snaps = json.loads((ckpt / "loop.json").read_text()).get("replay_snapshots")
            if not snaps:
                return  # a checkpoint that does not say what it needs: keep everything
            for snap in snaps:
                root = Path(snap).parent
                oldest[root] = min(oldest.get(root, snapshot_index(snap)), snapshot_index(snap))
        for root, k in oldest.items():
            if root.is_dir():
                prune(root, k, traces=self.prune_traces)

    def latest(self) -> ResumePoint | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "loop.json").exists():
            raise ConfigError(
                f"{pointer} names {path.name}, which is missing or incomplete; point it at a complete "
                f"step-<N> directory under {self.root} or start a new run (another run.name)"
            )
        return ResumePoint(path, json.loads((path / "loop.json").read_text()))


def _origins(snapshots: list[str]):
    """Each distinct "origin" stamp (trace metadata) in every traces segment of these snapshots' shards."""
    for root in {Path(snap).parent for snap in snapshots}:
        for path in sorted(root.glob("traces-*")):
            m = re.match(r"traces-(\d+)\.(log|parquet)$", path.name)
            if not m:
                continue
            rows = read_journal(path, TRACE_SCHEMA).batches if m.group(2) == "log" else read_sealed(path)
            for b in rows:
                for meta in set(b.column("metadata").to_pylist()):
                    origin = json.loads(meta).get("origin")
                    if origin:
                        yield origin


def replay_cursors(snapshots: list[str]) -> tuple[dict[int, int], dict[int, int]]:
    """From every trace the shards of these snapshots hold on disk: (stream -> problems drawn, worker ->
    batches) of the last rollout call of each that reached replay (the "origin" in trace metadata).

    Segments before the snapshot are read too: a call whose traces went in while the checkpoint was
    being taken is in the snapshot, but the loop had not yet seen it return when it saved its cursors,
    so loop.json alone would draw its prompts again (and a re-issued call only ever moves its own
    stream's cursor here). With `replay.prune_traces`, segments older than the oldest kept snapshot are
    gone; the loop had long seen those calls return, so loop.json covers them."""
    drawn: dict[int, int] = defaultdict(int)
    batches: dict[int, int] = defaultdict(int)
    for origin in _origins(snapshots):
        drawn[origin["stream"]] = max(drawn[origin["stream"]], origin["drawn"])
        batches[origin["worker"]] = max(batches[origin["worker"]], origin["batch"])
    return dict(drawn), dict(batches)


def unfinished_calls(snapshots: list[str], prompts_per_call: int) -> list[tuple[int, int]]:
    """(stream, drawn) of every rollout call only part of whose inserted groups reached replay: its worker (or
    the whole driver) was killed while the insert was under way, one shard had taken its part, and the
    re-issue never came. The stream's cursor is past the call, so a resume must re-issue it; its group
    ids are fixed by position (services/rollout_worker.py), so replay rejects the groups it already has."""
    seen: dict[tuple[int, int], set[int]] = defaultdict(set)
    meant: dict[tuple[int, int], set[tuple[int, ...]]] = defaultdict(set)  # each attempt's kept positions
    for origin in _origins(snapshots):
        if "position" in origin:
            call = origin["stream"], origin["drawn"]
            seen[call].add(origin["position"])
            whole = range(origin["drawn"] - prompts_per_call, origin["drawn"])
            meant[call].add(tuple(origin.get("kept", whole)))
    # finished once some attempt's groups are all in (a re-issue's repeats were rejected as duplicates,
    # so the union over attempts counts); groups a call dropped (uniform rewards, failed scores) are not owed
    return sorted(call for call, positions in seen.items() if not any(set(k) <= positions for k in meant[call]))
