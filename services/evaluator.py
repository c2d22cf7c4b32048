"""`Evaluator`: the loop's evaluate component — held-out accuracy of published versions, and its bookkeeping.

State (explicit, nothing else): `s` (`EvalState`, carried by checkpoints: every (version, t_published,
accuracy) measured and the RL seconds to +`TARGET_GAIN`), `initial_accuracy` (the version-0 eval, in
loop.json beside the state), `owed` (an eval was asked for while no worker could run it) and `inflight`
(eval ref -> (worker id, RL clock at dispatch)).

Invariants:
- the version-0 eval runs before the RL clock starts (`run_initial`), and its record says t=0;
- an eval runs on the worker the pool names (`pool.eval_worker`): the dedicated eval worker, handed learner
  rank 0's packed snapshot through the object store (it is not in the weight group), or else the lowest active
  rollout worker, on the weights it holds; it returns the version it evaluated, so a record never pairs an
  accuracy with the wrong version;
- with no worker to evaluate on, the eval is owed and sent once one is back; a worker that dies while it
  evaluates is reported to the pool (which replaces it) and the eval is sent again;
- the final accuracy is the newest version's, the best the maximum over the published versions' evals (the
  starting accuracy only when nothing was published).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import ray

TARGET_GAIN = 0.20  # the headline figure: RL seconds to +20 points of held-out accuracy


@dataclasses.dataclass
class EvalState:
    """What a checkpoint carries of the evaluator (loop.json `loop_state`, flat with the loop's counters)."""

    evals: list = dataclasses.field(default_factory=list)  # (version, t_published, accuracy)
    seconds_to_target: float | None = None


class Evaluator:
    def __init__(self, pool, rank0, problems: list, log, published_at: Callable[[int], float], get=None):
        """`pool`: the worker pool (`eval_worker`, `dedicated_eval`, `on_failed`); `rank0`: learner rank 0
        (`published_weights`); `problems`: the task's eval set; `log`: the run's MetricsLog; `published_at`:
        RL-clock time a version was published (the publisher's record)."""
        self.pool, self.rank0, self.problems, self.log, self.published_at = pool, rank0, problems, log, published_at
        self._get = ray.get if get is None else get
        self.s = EvalState()
        self.initial_accuracy = math.nan
        self.owed = False
        self.inflight: dict = {}  # eval ref -> (worker id, RL clock when it was dispatched)

    @property
    def busy(self) -> bool:
        return bool(self.inflight)

    def refs(self) -> list:
        return list(self.inflight)

    def run_initial(self) -> float:
        """The starting weights' accuracy, blocking; the RL clock (re)starts once it is known."""
        _, self.initial_accuracy = self._get(self.pool.eval_worker()[1].evaluate.remote(self.problems))
        self.log.restart_clock()
        self.log.write("eval", policy_version=0, accuracy=self.initial_accuracy, t_published=0.0)
        return self.initial_accuracy

    def request(self) -> None:
        """Evaluate the newest weights now, or as soon as a worker can (`owed`)."""
        target = self.pool.eval_worker()
        self.owed = target is None
        if target is None:
            return
        wid, worker = target
        if self.pool.dedicated_eval:  # dedicated: rank 0's snapshot goes to it through the object store
            ref = worker.evaluate_published.remote(self.rank0.published_weights.remote(), self.problems)
        else:
            ref = worker.evaluate.remote(self.problems)
        self.inflight[ref] = (wid, self.log.now())

    def tick(self) -> None:
        """Send an owed eval once a worker is back."""
        if self.owed and self.pool.eval_worker() is not None:
            self.request()

    def process(self, ready: set) -> None:
        """Record every finished eval among `ready` refs; a worker that died evaluating is replaced, eval resent."""
        for ref in [r for r in self.inflight if r in ready]:
            wid, sent_t = self.inflight.pop(ref)
            try:
                version, acc = self._get(ref)
            except ray.exceptions.RayActorError as e:
                self.pool.on_failed(wid, e, "eval")
                self.request()
                continue
            self._record(version, acc, wid, self.log.now() - sent_t)  # dispatch to result, queue included

    def _record(self, version: int, acc: float, wid: int, eval_s: float) -> None:
        t_pub = self.published_at(version)
        self.s.evals.append((version, t_pub, acc))
        self.log.write("eval", policy_version=version, accuracy=acc, t_published=t_pub, worker=wid, eval_s=eval_s)
        if self.s.seconds_to_target is None and acc >= self.initial_accuracy + TARGET_GAIN - 1e-9:
            self.s.seconds_to_target = t_pub

    def last_version(self) -> int:
        """The newest version evaluated (0: only the starting weights)."""
        return max((v for v, _, _ in self.s.evals), default=0)

    def gained(self, gain: float) -> bool:
        """Some eval reached `initial_accuracy + gain`."""
        return any(acc >= self.initial_accuracy + gain for _, _, acc in self.s.evals)

    def latest_accuracy(self) -> float:
        return self.s.evals[-1][2] if self.s.evals else self.initial_accuracy

    def summary(self) -> dict:
        """summary.json's accuracy keys (module docstring: final and best)."""
        evals = self.s.evals or [(0, 0.0, self.initial_accuracy)]  # nothing published: a budget shorter than one step
        final = max(evals, key=lambda e: (e[0], e[1]))
        return {
            "eval_accuracy_initial": self.initial_accuracy,
            "eval_accuracy_final": final[2],
            "eval_accuracy_best": max(a for _, _, a in evals),
            "rl_seconds_to_target": self.s.seconds_to_target,
            "target_gain": TARGET_GAIN,
        }
