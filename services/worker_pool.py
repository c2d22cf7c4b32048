"""`WorkerPool`: the run's rollout workers as a set that changes while the learner trains (issues #4, #6).

The pool owns the worker actors, the refs of their calls and the problem stream of each worker
(the same seeded stream the worker would draw itself, so a run nobody disturbs is unchanged); the
rules live in the pure `services.membership.Membership`.

- Death: a rollout, receive or start ref that fails with `RayActorError` (process killed, node
  lost), or any other error from a rollout (an engine crash leaves vLLM unusable: the actor is
  killed), marks the worker dead. Its unfinished call's problems are re-issued with the next
  dispatch; what it already got into replay stays. A fresh actor (a new worker id, so new seeds)
  replaces it while the pool is below its target, and produces nothing until it has received the
  current weights.
- Scaling: `set_target(n)`; `reconcile()` starts workers or drains the newest ones (no new calls;
  removed once their call is back).
- Evaluation: with `run.eval_worker: dedicated` one more member (the last at start-up) has the `eval`
  role: never a rollout call, not in the weight group; each evaluation hands it learner rank 0's
  snapshot of the published weights through the object store (`evaluate_published`). Otherwise the
  lowest-numbered active rollout worker evaluates between its rollout calls.

Weight-group membership. A gloo/NCCL group cannot grow or drop a member, so the pool re-forms the
broadcast group at a version boundary whenever its membership changed (a join, a death, a missed
broadcast, a drain; a death also makes rank 0 drop the current group at once, so a broadcast
waiting for the dead member to get ready fails now): `begin_broadcast` picks a fresh port on learner
rank 0, and every member
calls `receive_weights(group, rank)`, which joins the new group and takes its first broadcast —
the current weights, so a joiner starts on the current policy_version. A member that does not join
or ack within `weight_sync.timeout_s` fails that broadcast for the group (gloo cannot finish it
without the member); everyone reports it, the member is dropped from it (counted as
`broadcast_drops`), and the next boundary re-forms the group with the survivors. Rank 0 forms and
sends on its background thread, so training never waits on a joiner. Trade-off: one group is one
fan-out per update (what NCCL and gloo do best) but any change costs a rendezvous (<= timeout_s
when someone is missing) and a failed member costs everyone that update; one group per worker
would isolate failures but multiply rank 0's sends by N, and a relay tree (rank 0 -> a few
workers -> the rest) scales better but adds a hop and a second failure mode. At our sizes
(1-16 workers, updates every step) the re-formed single group is the simplest that cannot hang.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
from pathlib import Path

import ray

from learner.weight_transport import WeightGroup, WeightSyncError
from rollout.engine import EngineNeedsWeights
from services import metrics
from services.config import RunConfig
from services.membership import Membership, MembershipReport
from services.report import MetricsLog

log = logging.getLogger(__name__)


def _cause(err: BaseException) -> BaseException:
    """The exception a Ray task raised inside the actor (RayTaskError wraps it)."""
    if isinstance(err, ray.exceptions.RayTaskError) and getattr(err, "cause", None) is not None:
        return err.cause
    return err


def _brief(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]


class WorkerPool:
    def __init__(self, cfg: RunConfig, workers: list, replay, rank0, model_dir: Path, cache_dir: Path, log: MetricsLog):
        """`workers`: the actors started with the run, the dedicated eval worker last if the config has one."""
        from rollout.render import Renderer
        from rollout.tasks import make_task

        self.cfg, self.replay, self.rank0, self.log = cfg, replay, rank0, log
        self.model_dir, self.cache_dir = model_dir, cache_dir
        # The pool draws every worker's problems, so its task skips (and counts) over-long rendered prompts.
        self.task = make_task(cfg.task, Renderer.from_pretrained(cfg.render, model_dir))
        n_eval = int(cfg.run.eval_worker == "dedicated")
        self.m = Membership(len(workers) - n_eval, cfg.run.max_worker_replacements, eval_members=n_eval)
        ids = self.m.add_initial(len(workers) - n_eval)
        self.handles = dict(zip(ids + self.m.add_initial(n_eval, role="eval"), workers))
        self.streams = {wid: self._stream(wid) for wid in ids}  # rollout members only: eval draws nothing
        self.drawn: dict[int, int] = {}  # worker id -> problems drawn from its stream (the resume cursor)
        self.cursors: dict[int, tuple[int, int]] = {}  # worker id -> (drawn, batches) a resume continues from
        self.call_origin: dict[int, tuple[int, int]] = {}  # worker id -> (stream, drawn after) of its call
        self.reissue_origins: collections.deque[tuple[int, int]] = collections.deque()  # beside m.reissue
        self.pids: dict[int, int] = {}
        self.rollouts: dict = {}  # ref -> worker id
        self.receives: dict = {}  # ref -> (worker id, policy_version broadcast)
        self.starts: dict = {}
        self.stops: dict = {}
        self.latest_version = 0
        self._regroup_refs: set = set()  # receives of the last re-formed group's first broadcast
        self.groups_formed = 1  # weight groups planned, the start-up one included (rank 0 counts the same)

    def _stream(self, wid: int):
        return self.task.train_stream(seed=self.cfg.task.seed * 1000 + 1 + wid)  # = the worker's own stream

    # -- rollout calls ------------------------------------------------------------------------------
    def idle_active(self) -> list[int]:
        return self.m.idle_active()

    def inflight_prompts(self) -> int:
        return sum(len(m.in_flight) for m in self.m.live() if m.in_flight)

    def dispatch(self, wid: int, num_prompts: int) -> None:
        """One rollout call on worker `wid`: re-issued problems first, else `num_prompts` from its stream.

        The call carries its origin (stream, problems drawn from that stream once it is done): the worker
        stamps it on every trace it inserts, so a resume knows which prompts reached replay (checkpoint.py)."""
        reissued = bool(self.m.reissue)
        if reissued:
            problems, origin = self.m.reissue.popleft(), self.reissue_origins.popleft()
        else:
            problems = tuple(next(self.streams[wid]) for _ in range(num_prompts))
            self.drawn[wid] = self.drawn.get(wid, 0) + num_prompts
            origin = (wid, self.drawn[wid])
        self.call_origin[wid] = origin
        self.rollouts[self.handles[wid].rollout.remote(len(problems), list(problems), origin)] = wid
        self.m.on_dispatch(wid, problems)
        if reissued:
            self._event("reissued", wid, prompts=len(problems))

    def restore_cursors(self, cursors: dict[int, tuple[int, int]]) -> None:
        """Resume: each stream skips the problems it already gave out (streams are seeded, so the next
        ones are new) and each worker continues its batch numbers (its sampling seeds), from
        worker id -> (problems drawn, batches).

        Cursors of ids with no worker now (workers replaced before the kill) are kept: ids restart at 0
        in a resumed run, so a replacement started later gets such an id and must continue its stream,
        not draw that stream's first prompts (already trained on) again."""
        self.cursors = dict(cursors)
        for wid in self.streams:
            self._skip_drawn(wid)
        ray.get([h.restore_batches.remote(self.cursors[wid][1]) for wid, h in self.handles.items() if wid in cursors])

    def requeue(self, calls: list[tuple[int, int]], num_prompts: int) -> None:
        """Resume: queue again the calls (stream, drawn) only part of whose prompts reached replay, with
        their original origin; their problems are drawn again from the seeded stream."""
        for stream, drawn in calls:
            problems = tuple(itertools.islice(self._stream(stream), drawn - num_prompts, drawn))
            self.m.reissue.append(problems)
            self.reissue_origins.append((stream, drawn))
            self._event("requeued", None, stream=stream, drawn=drawn, prompts=len(problems))

    def _skip_drawn(self, wid: int) -> None:
        n = self.cursors.get(wid, (0, 0))[0]
        for _ in range(n - self.drawn.get(wid, 0)):
            next(self.streams[wid])
        self.drawn[wid] = max(self.drawn.get(wid, 0), n)

    # -- the weight group ---------------------------------------------------------------------------
    def begin_broadcast(self, policy_version: int) -> WeightGroup | None:
        """Queue a receive on every member; re-form the group first if membership changed.

        Returns the group learner rank 0 must form before sending (None = send on the current one)."""
        self.latest_version = policy_version
        if not self.m.group_dirty:
            for wid in self.m.broadcast_to():
                self._receive(wid)
            return None
        plan = self.m.plan_group()
        addr, port = ray.get(self.rank0.node_address.remote())
        group = WeightGroup(self.cfg.learner.weight_sync, addr, port, 1 + len(plan))
        self._regroup_refs = {self._receive(wid, group, rank) for rank, wid in enumerate(plan, start=1)}
        self.groups_formed += 1
        self.m.on_group_formed(plan)
        self._event("regroup", None, policy_version=policy_version, group=plan)
        return group

    def _receive(self, wid: int, group: WeightGroup | None = None, rank: int | None = None):
        ref = self.handles[wid].receive_weights.remote(group, rank, self.latest_version)
        self.receives[ref] = (wid, self.latest_version)
        self.m.members[wid].receiving = True
        return ref

    def receiving(self) -> bool:
        return bool(self.receives)

    def publish_must_wait(self) -> bool:
        """True while a re-formed group is still forming (<= timeout_s if a member never joins), or a
        known-broken group's receives are out: a publish now would block learner rank 0 on them."""
        return any(r in self.receives for r in self._regroup_refs) or (self.m.group_dirty and bool(self.receives))

    # -- scaling ------------------------------------------------------------------------------------
    def set_target(self, n: int) -> None:
        old = self.m.target
        self.m.set_target(n)
        if n != old:
            self._event("scaled", None, previous_target=old)

    def reconcile(self) -> None:
        to_start, to_drain = self.m.reconcile()
        for wid in to_start:
            from services.placement import start_rollout_worker

            self.handles[wid] = start_rollout_worker(self.cfg, self.model_dir, self.cache_dir, wid, self.replay)
            if self.m.members[wid].role == "rollout":  # the eval worker draws no problems
                self.streams[wid] = self._stream(wid)
                self._skip_drawn(wid)
                if wid in self.cursors:  # an actor runs its calls in order: this lands before any rollout
                    self.handles[wid].restore_batches.remote(self.cursors[wid][1])
            self.starts[self.handles[wid].pid.remote()] = wid
            self._event("starting", wid)
        for wid in to_drain:
            self._event("draining", wid)
        self._remove_drained()

    def _remove_drained(self) -> None:
        stopping = set(self.stops.values())
        for m in self.m.live():
            if m.worker_id not in stopping and self.m.removable(m.worker_id):
                self.stops[self.handles[m.worker_id].shutdown.remote()] = m.worker_id

    # -- completions --------------------------------------------------------------------------------
    def refs(self) -> list:
        return [*self.rollouts, *self.receives, *self.starts, *self.stops]

    def busy(self) -> bool:
        """Calls the loop must see back before the run ends (starting workers are not waited for)."""
        return bool(self.rollouts or self.receives or self.stops)

    def process(self, ready: set) -> list:
        """Handle every ready ref; return the `RolloutStats` of the rollout calls that succeeded."""
        done = [st for ref in [r for r in self.rollouts if r in ready] if (st := self._on_rollout(ref)) is not None]
        for ref in [r for r in self.receives if r in ready]:
            self._on_receive(ref)
        for ref in [r for r in self.starts if r in ready]:
            self._on_start(ref)
        for ref in [r for r in self.stops if r in ready]:
            self._on_stop(ref)
        self._remove_drained()
        return done

    def _on_rollout(self, ref):
        wid = self.rollouts.pop(ref)
        try:
            st = ray.get(ref)
        except Exception as e:  # noqa: BLE001 -- dead actor or crashed engine: replace the worker
            if isinstance(_cause(e), EngineNeedsWeights):  # alive, on its starting weights after a broken update
                self.reissue_origins.append(self.call_origin[wid])
                self._event("refused", wid, reissued_prompts=self.m.on_refused(wid), error=_brief(_cause(e)))
            else:
                self.on_failed(wid, e, "rollout")
            return None
        self.m.on_rollout_done(wid, st.policy_version)
        return st

    def _on_receive(self, ref) -> None:
        wid, sent = self.receives.pop(ref)
        if self.m.members[wid].state in ("dead", "removed"):
            return
        try:
            version = ray.get(ref)
        except Exception as e:  # noqa: BLE001
            if isinstance(_cause(e), WeightSyncError):  # alive, but the group failed: drop it from this broadcast
                self.m.on_missed(wid)
                self._event("missed_broadcast", wid, policy_version=sent, error=_brief(_cause(e)))
            else:
                self.on_failed(wid, e, "broadcast")
            return
        joined = self.m.on_received(wid, version)
        self.log.write("sync", worker=wid, policy_version=version)
        metrics.record_version_lag(wid, version, self.latest_version)
        if joined:
            self._event("joined", wid, policy_version=version)

    def _on_start(self, ref) -> None:
        wid = self.starts.pop(ref)
        try:
            self.pids[wid] = ray.get(ref)
        except Exception as e:  # noqa: BLE001
            self.on_failed(wid, e, "start")
            return
        self.m.on_started(wid)
        self._event("started", wid)

    def _on_stop(self, ref) -> None:
        wid = self.stops.pop(ref)
        try:
            ray.get(ref)
        except Exception as e:  # noqa: BLE001 -- it is going away either way
            log.warning(f"shutdown of rollout worker {wid} failed: {_brief(e)}")
        ray.kill(self.handles[wid], no_restart=True)
        self.m.on_removed(wid)
        self._event("removed", wid)

    def on_failed(self, wid: int, err: BaseException, during: str) -> None:
        """Worker `wid` died (or its engine failed): end it, queue its problems, let reconcile replace it."""
        if self.m.members[wid].state in ("dead", "removed"):
            return
        if not isinstance(err, ray.exceptions.RayActorError):
            ray.kill(self.handles[wid], no_restart=True)
        had_call = self.m.members[wid].in_flight is not None
        if self.m.members[wid].in_group:
            # A broadcast may be waiting for this member to get ready: fail it now, not after timeout_s
            # (the group is re-formed at the next boundary anyway).
            self.rank0.abandon_weight_group.remote(self.groups_formed)
        reissued = self.m.on_dead(wid)
        if had_call:
            self.reissue_origins.append(self.call_origin[wid])
        self._event("died", wid, during=during, error=_brief(_cause(err)), reissued_prompts=reissued)

    def record_startup_deaths(self, deaths: list) -> None:
        """Count and log the workers that died during start-up and were replaced there (services/startup.py):
        they spent the same `run.max_worker_replacements` budget as later deaths."""
        for d in deaths:
            self.m.counters["worker_deaths"] += 1
            self.m.counters["worker_replacements"] += 1
            self._event("died", d.worker_id, during=f"start-up {d.during}", error=d.error, reissued_prompts=0)

    # -- reporting and the end ----------------------------------------------------------------------
    @property
    def dedicated_eval(self) -> bool:
        """The run has an eval-only worker (`run.eval_worker: dedicated`), handed weights per evaluation."""
        return self.m.eval_target > 0

    def eval_worker(self) -> tuple[int, object] | None:
        """(worker id, handle) of the worker that evaluates now: the dedicated eval member when the config
        has one (None while it is replaced or joining), else the lowest-numbered active rollout worker."""
        active = self.m.active("eval" if self.dedicated_eval else "rollout")
        return (active[0], self.handles[active[0]]) if active else None

    def report(self) -> MembershipReport:
        return self.m.report(self.cfg.run.name)

    def summary(self) -> dict:
        return {**self.m.counters, "rollout_workers_final": len(self.m.active("rollout"))}

    def _event(self, event: str, wid: int | None, **fields) -> None:
        members = [[m.worker_id, m.state] for m in self.m.live()]
        self.log.write("membership", event=event, worker=wid, target=self.m.target, members=members, **fields)

    def kill(self, wid: int) -> None:
        """kill -9 worker `wid`'s process (fault tests; the worker must run on this host)."""
        if wid not in self.pids:
            self.pids[wid] = ray.get(self.handles[wid].pid.remote())
        os.kill(self.pids[wid], signal.SIGKILL)
        self._event("killed", wid, pid=self.pids[wid])

    def fetch_pids(self) -> None:
        self.pids.update(zip(self.handles, ray.get([h.pid.remote() for h in self.handles.values()])))

    def actors(self) -> list:
        """Handles of every member not yet removed (dead ones included: killing them is harmless)."""
        return [self.handles[wid] for wid, m in self.m.members.items() if m.state != "removed"]
