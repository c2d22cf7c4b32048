"""The chaos test's audit of one run, from what it leaves on disk (metrics.jsonl, checkpoints, replay).

- `audit_prompts`: every prompt drawn was inserted exactly once. Each trace's metadata carries the
  "origin" of its rollout call {stream, drawn, worker, batch} (services/rollout_worker.py): `drawn` is
  the stream's cursor once the call's `prompts_per_step` problems are taken, so the call covers prompt
  positions [drawn - prompts_per_step, drawn) of that stream (each trace also names its own position),
  and a dead worker's call is re-issued with its original origin (and group ids, so replay rejects the
  groups the first attempt already got in). Per stream, positions [0, final cursor) must each hold
  exactly one group of `group_size` traces: a missing position is a lost prompt, a second group (or a
  group with extra traces) a prompt inserted twice. What
  may legitimately be missing is named and counted: groups replay rejected, groups dropped for failed
  scores or uniform rewards (the `rollout` records of metrics.jsonl), and re-issues still queued when
  the run stopped (the `membership` records: prompts of dead workers and of calls requeued at a resume,
  minus prompts re-issued). Prompts
  a killed driver had dispatched that never reached replay are not "drawn": the resume rewinds the
  stream's cursor to what reached replay and draws them again (counted as re-drawn).
- `audit_versions`: learner steps 1..N each once along the run as resumed (steps a killed driver took
  after its last checkpoint are redone and superseded), `policy_version` non-decreasing over them, no
  step trained on a trace newer than its own version (a resume evicts the groups of the discarded
  versions after its checkpoint: `ReplayTable.evict_newer`), no rollout call at a version the learner had
  not yet made, and no acknowledged trace newer than the last published version.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

from replay.segments import read_dataset


def sessions(recs: list[dict]) -> list[list[dict]]:
    """metrics.jsonl split at each `resume` record (a resumed session starts with it). A resume logs the calls
    it requeues and the workers' receipt of the checkpoint's weights while it restores, just before its
    `resume` record: those trailing records move to the new session."""
    out: list[list[dict]] = [[]]
    for r in recs:
        if r["kind"] == "resume":
            prev, moved = out[-1], []
            while prev and (prev[-1]["kind"] == "sync" or prev[-1].get("event") == "requeued"):
                moved.insert(0, prev.pop())
            out.append(moved)
        out[-1].append(r)
    return [[r for r in s if r["kind"] == "resume"] + [r for r in s if r["kind"] != "resume"] for s in out]


def _calls(run: Path) -> dict[int, dict[int, dict]]:
    """stream -> drawn -> {"positions": position -> {group id: traces}, "callers": (worker, batch) pairs,
    "versions": policy_versions}: every acknowledged trace by the rollout call and the prompt it came from."""
    table = read_dataset(str(run / "replay")).select(["group_id", "metadata", "policy_version"])
    calls: dict[int, dict[int, dict]] = collections.defaultdict(dict)
    for gid, meta, version in zip(*(table[c].to_pylist() for c in ("group_id", "metadata", "policy_version"))):
        o = json.loads(meta)["origin"]
        call = calls[o["stream"]].setdefault(o["drawn"], {"positions": {}, "callers": set(), "versions": set()})
        groups = call["positions"].setdefault(o["position"], collections.Counter())
        groups[gid] += 1
        call["callers"].add((o["worker"], o["batch"]))
        call["versions"].add(version)
    return calls


def final_cursors(run: Path) -> dict[int, int]:
    """stream -> problems drawn, from the loop state of the checkpoint the run stopped with."""
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / latest / "loop.json").read_text())["loop_state"]["cursors"]
    items = state["__items__"] if "__items__" in state else [[int(k), v] for k, v in state.items()]
    return {int(k): v[0] for k, v in items}


def _owed(counter: collections.Counter) -> int:
    return counter["died"] + counter["refused"] + counter["requeued"]


def audit_prompts(run: Path, recs: list[dict], prompts_per_call: int, group_size: int) -> dict[str, int]:
    calls = _calls(run)
    rollouts = [r for r in recs if r["kind"] == "rollout"]
    excused = sum(r["rejected_groups"] + r["dropped_groups"] + r["uniform_groups"] for r in rollouts)
    missing, twice, drawn = [], [], 0
    for stream, by_drawn in sorted(calls.items()):
        ends = sorted(by_drawn)
        assert all(d % prompts_per_call == 0 for d in ends), (stream, ends)
        held = {p: groups for call in by_drawn.values() for p, groups in call["positions"].items()}
        for d, call in by_drawn.items():
            assert set(call["positions"]) <= set(range(d - prompts_per_call, d)), (stream, d, sorted(call["positions"]))
        missing += [(stream, p) for p in range(ends[-1]) if p not in held]
        twice += [(stream, p, dict(g)) for p, g in held.items() if len(g) > 1 or set(g.values()) != {group_size}]
        drawn += ends[-1]
    assert not twice, f"prompts inserted twice (stream, position, group -> traces): {twice[:5]}"
    assert len(missing) == excused, (
        f"{len(missing)} drawn prompt(s) never reached replay, but {excused} were rejected or dropped "
        f"(rollout records): prompts were lost: {missing[:10]}"
    )
    for stream, cursor in final_cursors(run).items():  # a call the loop saw complete is in replay
        top = max(calls.get(stream, {0: None}))
        assert cursor <= top, f"stream {stream}: cursor {cursor} at the end, but replay holds prompts only to {top}"
    per_session = [collections.Counter() for _ in sessions(recs)]
    for counter, session in zip(per_session, sessions(recs)):
        for r in session:
            # owed: a dead worker's call, a call refused by a worker whose update broke midway, a call requeued at
            # resume; paid: the re-issues
            if r["kind"] == "membership" and r["event"] in ("died", "refused", "requeued", "reissued"):
                counter[r["event"]] += r.get("reissued_prompts", r.get("prompts", 0))
    for counter in per_session:
        assert _owed(counter) >= counter["reissued"], f"more re-issued than owed: {counter}"
    last = per_session[-1]
    return {
        "prompts_drawn": drawn,
        "rollout_calls": sum(len(c) for c in calls.values()),
        "calls_finished_by_a_reissue": sum(len(c["callers"]) > 1 for by in calls.values() for c in by.values()),
        "groups_rejected_as_duplicates": sum(r.get("duplicate_groups", 0) for r in rollouts),
        "streams": len(calls),
        "prompts_reissued": sum(c["reissued"] for c in per_session),
        "prompts_requeued_at_resume": sum(c["requeued"] for c in per_session),
        "reissues_pending_at_driver_kill": sum(_owed(c) - c["reissued"] for c in per_session[:-1]),
        "prompts_reissue_pending_at_end": _owed(last) - last["reissued"],
        "prompts_rejected_or_dropped": excused,
        "prompts_lost": len(missing) - excused,  # asserted 0 above
        "prompts_inserted_twice": len(twice),  # asserted 0 above
    }


def effective_steps(recs: list[dict]) -> list[dict]:
    """The learner_step records of the run as resumed: each killed session's steps up to the checkpoint
    the next session resumed from (later ones were redone), then the next session's."""
    out: list[dict] = []
    for session in sessions(recs):
        if session and session[0]["kind"] == "resume":
            out = [r for r in out if r["learner_step"] <= session[0]["learner_step"]]
        out += [r for r in session if r["kind"] == "learner_step"]
    return out


def audit_versions(run: Path, recs: list[dict], max_steps: int) -> dict[str, int]:
    steps = effective_steps(recs)
    assert [r["learner_step"] for r in steps] == list(range(1, max_steps + 1))
    versions = [r["policy_version"] for r in steps]
    assert versions == sorted(versions), f"policy_version went backwards: {versions}"
    ahead = [r["learner_step"] for r in steps if max(r["trace_versions"]) > r["policy_version"]]
    assert not ahead, f"learner steps {ahead} trained on traces newer than the learner's version"
    for session in sessions(recs):  # a version exists once the learner step before it is logged
        known = session[0]["policy_version"] if session and session[0]["kind"] == "resume" else 0
        for r in session:
            if r["kind"] == "learner_step":
                known = max(known, r["policy_version"] + 1)  # the publish after this step
            elif r["kind"] == "rollout":
                assert r["policy_version"] <= known, f"a rollout at version {r['policy_version']} before it existed"
    published = json.loads((run / "summary.json").read_text())["policy_versions_published"]
    newest = max(max(c["versions"]) for by_drawn in _calls(run).values() for c in by_drawn.values())
    assert newest <= published, (newest, published)
    return {
        "learner_steps": len(steps),
        "policy_version_final": published,
        "newest_trace_version": newest,
        "groups_evicted_at_resume_as_newer": sum(
            r.get("evicted_newer_groups", 0) for r in recs if r["kind"] == "resume"
        ),
    }
