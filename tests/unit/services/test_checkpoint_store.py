"""The commit protocol under crashes at every step, what is synced, replay pruned with checkpoints, and
resume cursors read from the checkpoint and replay (never from metrics.jsonl)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import services.checkpoint_store as store_mod
from replay.config import ReplayConfig
from replay.schema import traces_to_batch
from replay.synthetic import group_batch
from replay.table import ReplayTable
from services.checkpoint import rewind_replay
from services.checkpoint_store import CheckpointStore, ResumePoint, replay_cursors, unfinished_calls


class Crash(BaseException):
    """A kill -9 at this point of the save (BaseException: nothing in the protocol may catch it)."""


def _save(store: CheckpointStore, step: int, marker: str, **state) -> Path:
    tmp = store.begin(step)
    (tmp / "weights.bin").write_text(marker)
    return store.commit(tmp, {"learner_step": step, "marker": marker, **state})


def _consistent(point: ResumePoint) -> str:
    """A resumable checkpoint: loop.json and the weights written with it agree."""
    assert (point.path / "weights.bin").read_text() == point.state["marker"]
    return point.state["marker"]


def _crash_at(monkeypatch, n: int) -> list[str]:
    """Make the n-th filesystem step of the protocol (rename, delete, directory sync, write) crash."""
    seen: list[str] = []

    def wrap(name, fn):
        def step(*args, **kwargs):
            seen.append(name)
            if len(seen) == n:
                raise Crash(name)
            return fn(*args, **kwargs)

        return step

    monkeypatch.setattr(os, "replace", wrap("rename", os.replace))
    monkeypatch.setattr(shutil, "rmtree", wrap("delete", shutil.rmtree))
    monkeypatch.setattr(store_mod, "fsync_dir", wrap("dirsync", store_mod.fsync_dir))
    monkeypatch.setattr(Path, "write_text", wrap("write", Path.write_text))
    return seen


def test_a_same_step_resave_crashing_at_every_step_leaves_a_complete_latest(tmp_path, monkeypatch):
    crash_points = 0
    for n in range(1, 50):
        run = tmp_path / f"run{n}"
        store = CheckpointStore(run, keep=1)
        _save(store, 10, "periodic")
        with monkeypatch.context() as m:
            seen = _crash_at(m, n)
            try:
                _save(store, 10, "stop")  # the clean-stop save right after a periodic one: same step
                finished = True
            except Crash:
                finished, crash_points = False, crash_points + 1
        # resume after the crash: `latest` names a complete checkpoint, the old or the new one
        marker = _consistent(store.latest())
        latest_moved = finished or seen[:-1].count("rename") >= 2  # the crash came after `latest` was replaced
        assert marker == ("stop" if latest_moved else "periodic"), (seen, marker)
        _save(store, 20, "next")  # the resumed run checkpoints again: leftovers are cleared
        assert [p.name for p in store.complete()] == ["step-000020"] and not list(store.root.glob(".tmp-*"))
        assert _consistent(store.latest()) == "next"
        if finished:
            break
    assert crash_points >= 8  # write, dir syncs, both renames and the deletion were each crashed at


def test_resaving_a_step_never_touches_the_directory_latest_names(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    first = _save(store, 10, "periodic")
    second = _save(store, 10, "stop")
    assert (first.name, second.name) == ("step-000010", "step-000010.1")
    assert store.latest().path == second and not first.exists()  # the newer copy of step 10 supersedes it
    third = _save(store, 10, "again")
    assert third.name == "step-000010.2" and not second.exists() and _consistent(store.latest()) == "again"


def test_latest_is_kept_even_when_newer_directories_exist(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    _save(store, 10, "a")
    (store.root / "step-000030").mkdir()  # renamed but `latest` never moved (crash) and incomplete
    _save(store, 20, "b")
    assert [p.name for p in store.complete()] == ["step-000020"] and not (store.root / "step-000030").exists()


def test_commit_syncs_every_file_and_directory_before_it_counts(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    store = CheckpointStore(tmp_path, keep=2)
    tmp = store.begin(5)
    (tmp / "deepspeed").mkdir()
    (tmp / "deepspeed" / "rank0.pt").write_bytes(b"w")
    final = store.commit(tmp, {"learner_step": 5})
    names = [Path(p).name for p in synced]
    for must in ("rank0.pt", "loop.json", "deepspeed", tmp.name, ".latest.tmp", "checkpoints"):
        assert must in names, (must, names)
    assert names.index("loop.json") < names.index("checkpoints") and final.exists()  # synced before the rename


def _cfg(tmp_path) -> ReplayConfig:
    return ReplayConfig(segment_dir=str(tmp_path / "replay"), max_times_sampled=1)


def test_pruned_checkpoints_take_their_replay_snapshots_and_journals_with_them(tmp_path):
    table = ReplayTable(_cfg(tmp_path))
    store = CheckpointStore(tmp_path / "run", keep=2)
    snaps = []
    for step in (1, 2, 3):
        table.insert(group_batch([f"s{step}-{i}" for i in range(3)], seed=step))
        table.sample(1, 0)
        snaps.append(table.checkpoint())
        _save(store, step, f"m{step}", replay_snapshots=[snaps[-1]])
    shard = tmp_path / "replay" / "shard-0"
    assert not Path(snaps[0]).exists() and Path(snaps[1]).exists() and Path(snaps[2]).exists()
    oldest = int(Path(snaps[1]).stem.split("-")[1])
    left = [p.name for p in shard.iterdir() if p.name.startswith(("events", "snapshot"))]
    assert left and all(int(n.split("-")[1].split(".")[0]) >= oldest for n in left)
    assert len(list(shard.glob("traces-*.parquet"))) == 3  # the dataset stays (replay.prune_traces: false)
    # either kept checkpoint can still be resumed from (the newest, then, failing that, the older one)
    for point in (store.latest(), ResumePoint(store.complete()[0], {"replay_snapshots": [snaps[1]]})):
        rewind_replay(point)
        assert len(ReplayTable(_cfg(tmp_path))) > 0


def _stamped(
    tag: str, stream: int, drawn: int, worker: int, batch: int, position: int | None = None, kept: list | None = None
):
    from replay.schema import batch_to_traces

    origin = {"stream": stream, "drawn": drawn, "worker": worker, "batch": batch}
    if position is not None:
        origin["position"] = position
    if kept is not None:
        origin["kept"] = kept
    traces = batch_to_traces(group_batch([tag], group_size=2, seed=drawn))
    return traces_to_batch([t.__class__(**{**t.__dict__, "metadata": json.dumps({"origin": origin})}) for t in traces])


def test_resume_cursors_are_the_last_call_of_each_stream_that_reached_replay(tmp_path):
    table = ReplayTable(_cfg(tmp_path))
    table.insert(_stamped("a", stream=0, drawn=12, worker=0, batch=3))
    table.insert(_stamped("b", stream=1, drawn=8, worker=1, batch=2))
    snap = table.checkpoint()
    table.insert(_stamped("c", stream=1, drawn=4, worker=0, batch=4))  # stream 1 re-issued on worker 0
    table.insert(group_batch(["unstamped"], seed=1))
    assert replay_cursors([snap]) == ({0: 12, 1: 8}, {0: 4, 1: 2})
    table.close()  # sealed segments read the same
    assert replay_cursors([snap]) == ({0: 12, 1: 8}, {0: 4, 1: 2})


def test_a_call_inserted_while_the_checkpoint_is_taken_is_not_drawn_again(tmp_path):
    """The loop saves its cursors from the calls it has seen return; a call that inserted just before the
    replay snapshot but had not returned yet is in the snapshot. Reading only the segments after the
    snapshot, the resume drew its prompts again and inserted them twice."""
    table = ReplayTable(_cfg(tmp_path))
    table.insert(_stamped("seen", stream=0, drawn=4, worker=0, batch=1))  # loop.json: stream 0 at 4
    table.insert(_stamped("racing", stream=0, drawn=8, worker=0, batch=2))  # returned after the save
    snap = table.checkpoint()
    table.insert(_stamped("after", stream=1, drawn=4, worker=1, batch=1))
    assert replay_cursors([snap]) == ({0: 8, 1: 4}, {0: 2, 1: 1})


def test_a_call_only_part_of_whose_prompts_reached_replay_is_unfinished(tmp_path):
    """Two prompts per call. Stream 0's call 2 got one group in before its worker died, and its re-issue
    brought the other: finished. Stream 1's call 1 got one group in before the driver was killed: unfinished."""
    table = ReplayTable(_cfg(tmp_path))
    table.insert(_stamped("s0p0", stream=0, drawn=2, worker=0, batch=1, position=0))
    table.insert(_stamped("s0p1", stream=0, drawn=2, worker=0, batch=1, position=1))
    table.insert(_stamped("s0p2", stream=0, drawn=4, worker=0, batch=2, position=2))
    snap = table.checkpoint()
    table.insert(_stamped("s0p3", stream=0, drawn=4, worker=2, batch=1, position=3))  # the re-issue
    table.insert(_stamped("s1p1", stream=1, drawn=2, worker=1, batch=1, position=1))
    table.insert(_stamped("old", stream=1, drawn=4, worker=1, batch=2))  # no position: not judged
    assert unfinished_calls([snap], prompts_per_call=2) == [(1, 2)]


def test_latest_naming_a_missing_checkpoint_is_a_clear_error(tmp_path):
    from services.config import ConfigError

    store = CheckpointStore(tmp_path, keep=2)
    _save(store, 1, "x")
    (store.root / "latest").write_text("step-000099")
    with pytest.raises(ConfigError, match="step-000099.*missing or incomplete"):
        store.latest()


def test_a_call_that_dropped_groups_is_finished_once_the_groups_it_kept_are_in(tmp_path):
    """Four prompts per call, uniform groups dropped before the insert. Stream 0's call kept positions 0 and
    2, both in: finished (the dropped 1 and 3 are not owed). Stream 1's call kept 4..7, only 5 got in before
    the kill: unfinished. Stream 2's first attempt kept 8, 9, got 8 in and died; its re-issue kept 8, 9 too
    (8 was rejected as a duplicate, so only 9 carries the re-issue's stamp): finished."""
    table = ReplayTable(_cfg(tmp_path))
    table.insert(_stamped("s0p0", stream=0, drawn=4, worker=0, batch=1, position=0, kept=[0, 2]))
    table.insert(_stamped("s0p2", stream=0, drawn=4, worker=0, batch=1, position=2, kept=[0, 2]))
    table.insert(_stamped("s1p5", stream=1, drawn=8, worker=1, batch=2, position=5, kept=[4, 5, 6, 7]))
    snap = table.checkpoint()
    table.insert(_stamped("s2p8", stream=2, drawn=12, worker=2, batch=3, position=8, kept=[8, 9]))
    table.insert(_stamped("s2p9", stream=2, drawn=12, worker=0, batch=4, position=9, kept=[8, 9]))
    assert unfinished_calls([snap], prompts_per_call=4) == [(1, 8)]
    table.insert(_stamped("s1p6", stream=1, drawn=8, worker=0, batch=5, position=6, kept=[5, 6]))
    assert unfinished_calls([snap], prompts_per_call=4) == []  # a re-issue that kept 5, 6 finished it
