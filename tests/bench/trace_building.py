"""Benchmark: rollout -> Arrow trace building, per-trace validation (before) against one batch check (now).

    .venv/bin/python -m tests.bench.trace_building [--traces 256] [--tokens 256] [--group-size 8] [--repeats 5]

A rollout-sized batch (`--traces` completions of `--tokens` tokens, a 64-token prompt per group of
`--group-size`) of `Trace` records, as `rollout.sampling.sample_groups` makes them, becomes the Arrow batch
a rollout worker inserts into replay (`traces_to_batch`, prompt held once per group). Measured in the same
run, best of `--repeats`:
- before: `validate_trace` on every trace (a one-row RecordBatch and every check per trace), then
  `traces_to_batch` through `RecordBatch.from_pydict` of per-row Python lists, then `prompt_once`;
- now: `validate_traces` (one vectorised `invalid_rows` over the batch), then `traces_to_batch` from flat
  offsets/values buffers, then `prompt_once`.
And from the engine's outputs (the same completions, prompts and rewards, a stub renderer and scorer so
generation and scoring cost nothing), what a rollout worker inserts:
- traces: `rollout.sampling.sample_groups` (one `Trace` per completion, checked) -> `traces_to_batch` ->
  `prompt_once`, the worker's previous path;
- columns: `rollout.sampling.sample_group_batch` (flat buffers) -> `ScoredBatch.to_arrow` (checked, prompt
  once), the worker's path now.
Writes tests/bench/results/trace_building.json with `before_s`, `now_s` and `speedup` (before / now), and
`from_engine_traces_s`, `from_engine_columns_s`, `from_engine_speedup` (traces / columns).
Numbers on a shared 2-core box (taken under load): read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from replay.schema import TRACE_SCHEMA, Trace, prompt_once, traces_to_batch, validate_trace, validate_traces
from rollout.engine import Completion
from rollout.sampling import sample_group_batch, sample_groups
from rollout.tasks import Problem

RESULTS = Path(__file__).resolve().parent / "results" / "trace_building.json"


def make_traces(n: int, tokens: int, group_size: int, seed: int = 0) -> list[Trace]:
    rng = np.random.default_rng(seed)
    prompts = [tuple(int(x) for x in rng.integers(0, 4000, 64)) for _ in range(-(-n // group_size))]
    return [
        Trace(
            group_id=f"g{i // group_size}",
            prompt_ids=prompts[i // group_size],
            completion_ids=tuple(int(x) for x in rng.integers(0, 4000, tokens)),
            behaviour_logprobs=tuple(float(x) for x in -rng.random(tokens)),
            reward=float(i % 2),
            policy_version=0,
            task="bench",
        )
        for i in range(n)
    ]


def before(traces: list[Trace]) -> pa.RecordBatch:
    """The previous path: a full check per trace, then a batch from per-row Python lists."""
    for t in traces:
        validate_trace(t)
    cols = {f.name: [getattr(t, f.name) for t in traces] for f in TRACE_SCHEMA}
    for name in ("prompt_ids", "completion_ids", "behaviour_logprobs"):
        cols[name] = [list(x) for x in cols[name]]
    cols["token_rewards"] = [None if x is None else list(x) for x in cols["token_rewards"]]
    return prompt_once(pa.RecordBatch.from_pydict(cols, schema=TRACE_SCHEMA))


def now(traces: list[Trace]) -> pa.RecordBatch:
    validate_traces(traces)
    return prompt_once(traces_to_batch(traces))


class _Outputs:
    """Fixed engine outputs for `n` completions in groups of `group_size`, with a stub renderer and scorer."""

    def __init__(self, n: int, tokens: int, group_size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        groups = -(-n // group_size)
        self.group_size, self.policy_version = group_size, 0
        self.problems = [Problem(f"q{i}", str(i), "bench") for i in range(groups)]
        self.prompts = {p.prompt: tuple(int(x) for x in rng.integers(0, 4000, 64)) for p in self.problems}
        self.groups = [
            [
                Completion(
                    tuple(int(x) for x in rng.integers(0, 4000, tokens)),
                    tuple(float(x) for x in -rng.random(tokens)),
                    "length",
                )
                for _ in range(group_size)
            ]
            for _ in range(groups)
        ]
        self.rewards = [float(i % 2) for i in range(groups * group_size)]

    def generate(self, prompts, n, seed=None):
        return self.groups

    def encode_prompt(self, problem):
        return self.prompts[problem.prompt]

    def completion_text(self, ids):
        return ""

    def args(self):
        return (self, self.problems, self, lambda p, text: 0.0, self.group_size)

    def kwargs(self):
        return {"score_batch": lambda items: self.rewards, "group_ids": [f"g{i}" for i in range(len(self.problems))]}


def from_engine_traces(out: _Outputs) -> pa.RecordBatch:
    return prompt_once(traces_to_batch(sample_groups(*out.args(), **out.kwargs())))


def from_engine_columns(out: _Outputs) -> pa.RecordBatch:
    return sample_group_batch(*out.args(), **out.kwargs()).to_arrow()


def best_of(fn, traces, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(traces)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    traces = make_traces(args.traces, args.tokens, args.group_size)
    if not before(traces).equals(now(traces)):
        raise SystemExit("the two paths built different batches")
    b, n = best_of(before, traces, args.repeats), best_of(now, traces, args.repeats)
    outputs = _Outputs(args.traces, args.tokens, args.group_size)
    stable = [f.name for f in TRACE_SCHEMA if f.name not in ("trace_id", "created_at")]
    if not from_engine_traces(outputs).select(stable).equals(from_engine_columns(outputs).select(stable)):
        raise SystemExit("the trace and column paths built different batches")
    et, ec = best_of(from_engine_traces, outputs, args.repeats), best_of(from_engine_columns, outputs, args.repeats)
    out = {
        "traces": args.traces,
        "tokens_per_trace": args.tokens,
        "group_size": args.group_size,
        "before_s": b,
        "now_s": n,
        "speedup": b / n,
        "from_engine_traces_s": et,
        "from_engine_columns_s": ec,
        "from_engine_speedup": et / ec,
        "note": "best of repeats; taken on a shared 2-core box under load",
    }
    print("| traces x tokens | before (s) | now (s) | speedup |\n|---|---|---|---|")
    print(f"| {args.traces} x {args.tokens} | {b:.4f} | {n:.4f} | {b / n:.1f}x |")
    print("\n| from engine outputs | Trace per completion (s) | flat columns (s) | speedup |\n|---|---|---|---|")
    print(f"| {args.traces} x {args.tokens} | {et:.4f} | {ec:.4f} | {et / ec:.1f}x |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
