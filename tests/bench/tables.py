"""The tables of tests/bench/README.md (and the few the top README quotes), rendered from
tests/bench/results/*.json so no number is typed by hand.

    .venv/bin/python -m tests.bench.tables          # rewrite the generated blocks of tests/bench/README.md

Contract: the README holds blocks `<!-- table:NAME -->` ... `<!-- /table -->`; `render_readme(text)` replaces
each block's body with `TABLES[NAME]()` (read from the results files now) and leaves the prose around them
alone. `tests/unit/bench/test_tables.py` fails when the checked-in README differs from what the results
files render, so a re-run benchmark cannot leave stale numbers in the docs.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
USER_README = Path(__file__).resolve().parents[2] / "README.md"  # the user's guide quotes a few of them
DOCS = (README, USER_README)
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", flags=re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _rows(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def spine() -> str:
    d = _load("spine")
    ours, trl = d["ours"], d["trl"]
    gains = sorted(d["seconds_to_gain"], key=lambda g: float(g))
    rows = [
        ["held-out accuracy after the cold start", _f(ours["eval_accuracy_initial"]), _f(trl["initial_accuracy"])],
        [
            f"held-out accuracy at the end ({ours['rl_wall_s']:.0f} s of RL; TRL stops at its target)",
            f"{_f(ours['eval_accuracy_final'])} (best {_f(ours['eval_accuracy_best'])})",
            _f(trl["final_accuracy"]),
        ],
        ["learner steps", str(ours["learner_steps"]), f"{trl['steps']} (lr {d['trl_lr']:g})"],
    ]
    for g in gains:
        first, mean3 = d["seconds_to_gain"][g], d["seconds_to_gain_3eval_mean"][g]
        rows.append(
            [
                f"RL seconds to {g} points (first eval / mean of 3 evals)",
                f"{_f(first['ours'], 1)} / {_f(mean3['ours'], 1)}",
                f"{_f(first['trl'], 1)} / {_f(mean3['trl'], 1)} (TRL/ours {_f(first['trl_over_ours'], 2)}x / "
                f"{_f(mean3['trl_over_ours'], 2)}x)",
            ]
        )
    rows.append(["whole job incl. start-up (cold start cached)", f"{ours['wall_s']:.0f} s", ""])
    return _rows(["", "Flywheel", "TRL GRPOTrainer"], rows)


def staleness() -> str:
    d = _load("staleness")
    rows = []
    for c in d["cells"]:
        seeds = c.get("seeds", 1)
        rows.append(
            [
                "0 (sync)" if c["staleness"] == 0 else str(c["staleness"]),
                str(c.get("max_staleness_seen", "-")),
                c["loss"],
                str(c.get("updates_per_batch", 1)),
                str(seeds),
                _f(c["accuracy_final"]),
                _f(c["accuracy_best"]),
                _f(c["kl_behaviour_mean"]),
                _f(c["learner_steps"], 0),
                f"{_f(c['seconds_to_plus10'], 1)} ({c.get('reached_plus10', '-')}/{seeds})",
                f"{_f(c['seconds_to_plus20'], 1)} ({c.get('reached_plus20', '-')}/{seeds})",
                "-" if c["speedup_vs_sync_plus20"] is None else f"{c['speedup_vs_sync_plus20']:.2f}x",
            ]
        )
    header = ["max staleness", "seen", "loss", "updates/batch", "seeds", "final acc.", "best", "KL(behaviour)"]
    header += ["learner steps", "s to +10 (reached)", "s to +20 (reached)", "vs sync (+20)"]
    return _rows(header, rows)


def replay() -> str:
    d = _load("replay")
    naive = d["rows"][0]["sample_traces_per_s"]
    rows = [
        [
            r["name"],
            f"{r['sample_traces_per_s'] / 1e3:.1f}k",
            f"{r['sample_traces_per_s'] / naive:.1f}x",
            f"{r['insert_traces_per_s'] / 1e3:.1f}k",
        ]
        for r in d["rows"]
    ]
    table = _rows(["", "sample traces/s", "vs naive", "insert traces/s"], rows)
    return table + (
        f"\nMemory held: {_f(d['memory_over_raw'], 2)}x the raw token bytes; load average during the run "
        f"{d['workload']['load_avg_1m']:.1f}.\n"
    )


def replay_durability() -> str:
    d = _load("replay")["durability"]
    rows = [
        [mode, f"{d[f'appends_per_s_{mode}']:.0f}", f"{d[f'sample_calls_per_s_{mode}']:.0f}"]
        for mode in ("memory", "no_fsync", "fsync")
    ]
    return _rows(["journal", "appends/s", "sample calls/s"], rows) + (
        f"\n{d['traces_per_append']} traces ({d['bytes_per_append'] / 1e3:.0f} kB) per append on {d['filesystem']}; "
        f"fsync costs {1 - d['fsync_over_no_fsync']:.0%} of append throughput "
        f"({d['insert_ms_fsync']:.1f} vs {d['insert_ms_no_fsync']:.1f} ms per insert).\n"
    )


def weight_sync() -> str:
    d = _load("weight_sync")
    rows = []
    for size, s in d["sizes"].items():
        m = s["methods"]
        rows.append(
            [
                f"{size} ({s['bytes'] / 2**20:.0f} MiB, {s['tensors']} tensors)",
                f"{m['naive_prealloc']['min_s'] * 1e3:.0f} ms",
                f"{m['bucket_32MB']['min_s'] * 1e3:.0f} ms",
                f"{m['bucket_256MB']['min_s'] * 1e3:.0f} ms",
                f"{m['memcpy']['min_s'] * 1e3:.0f} ms",
                f"{s['bucketed_over_naive']['32MB']:.2f}x",
            ]
        )
    header = ["model", "per-tensor (prealloc)", "bucketed 32 MB", "bucketed 256 MB", "memcpy", "bucketed/naive"]
    table = _rows(header, rows)
    pub = d["publish"]["cells"]
    prow = [
        [
            key.replace("/", " "),
            f"{c['sender_blocked_s'] * 1e3:.0f} ms",
            f"{c['sender_extra_over_model_bytes']:.2f}",
            f"{c['receive_load_s']:.2f} s",
            f"{c['receiver_peak_over_model_bytes']:.2f}",
        ]
        for key, c in pub.items()
    ]
    header = ["model, wire dtype, path", "sender blocked", "sender extra / model bytes", "receive + load"]
    return (
        table
        + "\nPublishing (old = host fp32 copy on rank 0; new = streamed buckets):\n\n"
        + _rows([*header, "receiver peak / model bytes"], prow)
    )


def learner() -> str:
    d = _load("learner")
    base = d["configs"]["old"]
    rows = [
        [
            name,
            json.dumps(c["learner_config"]).replace("|", "/"),
            f"{c['tokens_per_s']:.1f}",
            f"{c['tokens_per_s'] / base['tokens_per_s']:.2f}x",
            f"{c['peak_rss_gib']:.2f}",
            f"{c['peak_rss_gib'] / base['peak_rss_gib']:.2f}x",
            f"{c['step_peak_over_before_gib']:.2f}",
        ]
        for name, c in d["configs"].items()
    ]
    header = ["config", "learner settings", "tokens/s", "vs old", "peak RSS (GiB)", "vs old", "step peak over resident"]
    return _rows(header, rows) + (
        f"\nHeadline ({d['headline_config']}): tokens/s {d['tokens_per_s_ratio']:.2f}x (goal >= 1.5), peak memory "
        f"{d['peak_memory_ratio']:.2f}x (goal <= 0.35) of the old step. "
        f"Model: {d['meta']['model']}; {d['meta']['rows']} sequences of {d['meta']['prompt_tokens']} prompt + up to "
        f"{d['meta']['completion_tokens_max']} completion tokens. Collate from Arrow buffers: "
        f"{d['collate']['collate_speedup']:.1f}x the to_pydict path.\n"
    )


def dataflow() -> str:
    d = _load("dataflow")
    rows = [
        [
            "trace payload through the driver (B/step)",
            _f(d["driver_payload_bytes_per_step"], 0),
            _f(d["driver_payload_bytes_per_step_baseline"], 0),
        ],
        ["control bytes the driver received (B/step)", _f(d["driver_control_bytes_per_step"], 0), "-"],
        ["learner idle fraction", _f(d["learner_idle_fraction"]), _f(d["learner_idle_fraction_baseline"])],
        ["traces trained per second", _f(d["learner_samples_per_s"], 2), _f(d["learner_samples_per_s_baseline"], 2)],
    ]
    out = _rows(["", "direct (replay -> ranks)", "driver relays (baseline)"], rows)
    c = d["collate_s"]
    out += "\n" + _rows(
        ["collate (fastest of 20, s)", "to_pydict", "Arrow", "Arrow, full layout", "speedup"],
        [
            [
                f"{label} traces per rank",
                _f(c[key]["to_pydict"], 5),
                _f(c[key]["arrow"], 5),
                _f(c[key]["arrow_full"], 5),
                f"{d[speedup]:.1f}x",
            ]
            for label, key, speedup in (
                ("16", "rank_share", "collate_speedup_this_step"),
                ("256", "rank_share_256", "collate_speedup"),
            )
        ],
    )
    return out + f"\n{d['note']}\n"


def passk(name: str) -> Callable[[], str]:
    def table() -> str:
        d = _load(f"passk_{name}")
        models = d["models"]
        header = ["k"] + [f"{m['label']}: pass@k / maj@k" for m in models]
        rows = [
            [str(point["k"])] + [f"{_f(m['curve'][i]['pass_at_k'])} / {_f(m['curve'][i]['maj_at_k'])}" for m in models]
            for i, point in enumerate(models[0]["curve"])
        ]
        rows.append(["greedy pass@1"] + [_f(m["greedy_pass_at_1"]) for m in models])
        b = d["bench"]
        return _rows(header, rows) + (
            f"\n{d['settings']['num_prompts']} held-out prompts, n={d['settings']['n']} samples each at T="
            f"{d['settings']['temperature']:g}; RL ran {b['run_summary']['learner_steps']} learner steps in "
            f"{b['rl_s']:g} s; load average {b['loadavg_before'][0]:.1f} before, {b['loadavg_after'][0]:.1f} after.\n"
        )

    return table


def chaos() -> str:
    d = _load("chaos")
    kills = f"{d['kills_worker']} rollout worker, {d['kills_shard']} replay shard, {d['kills_driver']} driver"
    rows = [
        ["kill -9s (seeded schedule)", kills],
        ["learner steps / policy_version at the end", f"{d['learner_steps']} / {d['policy_version_final']}"],
        ["prompts drawn / rollout calls", f"{d['prompts_drawn']} / {d['rollout_calls']}"],
        [
            "prompts re-issued (a dead worker's call, or one refused after a broken update) / requeued at resume",
            f"{d['prompts_reissued']} / {d['prompts_requeued_at_resume']}",
        ],
        ["groups rejected as duplicates (a re-issue repeating what got in)", str(d["groups_rejected_as_duplicates"])],
        ["prompts rejected or dropped (counted in rollout records)", str(d["prompts_rejected_or_dropped"])],
        ["prompts lost / inserted twice", f"{d['prompts_lost']} / {d['prompts_inserted_twice']}"],
        [
            "groups acknowledged = consumed + evicted (stale, capacity) + held",
            f"{d['groups_acknowledged']} = {d['groups_consumed']} + ({d['groups_evicted_stale']}, "
            f"{d['groups_evicted_capacity']}) + {d['groups_held']}",
        ],
        [
            "of the stale: groups of versions newer than the resumed checkpoint (their policy was discarded)",
            str(d["groups_evicted_at_resume_as_newer"]),
        ],
        ["acknowledged groups lost", str(d["groups_lost"])],
        *(
            [["groups of a draw reclaimed from a shard killed before it replied", str(d[k])]]
            if (k := "groups_reclaimed_after_a_shard_death") in d
            else []
        ),
        ["resumes / wall seconds (whole test)", f"{d['resumes']} / {d['wall_s']}"],
    ]
    return _rows(["chaos audit (seed " + str(d["seed"]) + ")", "value"], rows) + f"\nTaken {d['load_note']}.\n"


def ab(name: str) -> Callable[[], str]:
    """An A/B comparison from tests/bench/ab_runs.py: one row per arm, means over seeds at equal learner steps."""

    def table() -> str:
        d = _load(name)
        rows = []
        for c in d["cells"]:
            lo_hi = c.get("accuracy_final_min_max")
            rows.append(
                [
                    c["arm"],
                    str(c["seeds"]),
                    _f(c["learner_steps"], 0),
                    _f(c["accuracy_initial"]),
                    f"{_f(c['accuracy_final'])}" + (f" ({_f(lo_hi[0])}-{_f(lo_hi[1])})" if lo_hi else ""),
                    _f(c.get("accuracy_last3")),
                    _f(c.get("accuracy_last3_vs_baseline"), 2),
                    _f(c.get("rl_wall_s"), 0),
                ]
            )
        header = ["arm", "seeds", "learner steps", "acc. initial", "acc. final (min-max)", "last 3 evals"]
        loads = [x for r in d["runs"] for x in r["load_avg_1m"]]
        t = d.get("teacher_run")
        size = (t or {}).get("size") or {}
        larger = (
            f" on a larger model (hidden {size.get('hidden') or 'as student'}, "
            f"layers {size.get('layers') or 'as student'})"
            if any(size.values())
            else ""
        )
        if t and t["learner_steps"] == 0:
            params = f", {t['params'] / 1e6:.1f}M parameters" if t.get("params") else ""
            recipe = " ".join(t.get("overrides") or []) or "the student's recipe"
            teacher = (
                f"\nTeacher{larger}{params}: held-out greedy accuracy {_f(t['accuracy_final'])}, its cold start "
                f"alone ({recipe}), no RL.\n"
            )
        elif t:
            teacher = (
                f"\nTeacher{larger}: held-out accuracy {_f(t['accuracy_final'])} (best {_f(t['accuracy_best'])}) "
                f"after {t['learner_steps']} learner steps from a {_f(t['accuracy_initial'])} cold start.\n"
            )
        else:
            teacher = ""
        if d.get("rl_s"):
            note = (
                f"\nMeans over seeds; accuracy on the held-out split after {d['rl_s']:g} s of RL in every arm (equal "
                f"wall-clock; learner steps differ). Load average {min(loads):.1f}-{max(loads):.1f} around the runs.\n"
            )
        else:
            note = (
                "\nMeans over seeds; accuracy on the held-out split at the same learner step in every arm. Load "
                f"average {min(loads):.1f}-{max(loads):.1f} around the runs (wall seconds are noisy, steps are not).\n"
            )
        return _rows([*header, "last 3 vs baseline", "RL wall s"], rows) + teacher + note

    return table


def _points(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def rlhf() -> str:
    d = _load("rlhf")
    goals, rl, dpo = d["goals"], d.get("rl"), d.get("dpo")
    rows = [
        [
            "reward model: held-out pairwise accuracy (verified correct vs wrong)",
            _f(d["rm_pairwise_accuracy"]),
            f">= {goals['rm_pairwise_accuracy']:.2f}",
        ],
        [
            "RL against the reward model: gold held-out accuracy gain (points)",
            "not run" if rl is None else _points(d["rl_gold_gain"]),
            f">= +{100 * goals['rl_gold_gain']:.0f} in {goals['rl_wall_s']} s",
        ],
        ["DPO on the same pairs: gold held-out accuracy gain (points)", _points(d["dpo_gold_gain"]), "reported"],
    ]
    if rl is not None:
        best = rl["eval_accuracy_best"] - rl["eval_accuracy_initial"]
        rows.insert(2, ["RL: gold gain at its best evaluation (points)", _points(best), "reported"])
    base = d.get("rm_base")
    if isinstance(base, dict):
        size = " ".join(o for o in base["overrides"] if not o.startswith("run."))
        rows.insert(
            1,
            [
                f"reward model's trunk: {base['params'] / 1e6:.1f}M parameters ({size}), greedy accuracy",
                _f(base["greedy_accuracy"]),
                "-",
            ],
        )
    p = d["pairs"]
    note = (
        f"\nPairs: {p.get('train_all', p.get('train'))} train ({p.get('rm_train', '-')} verified used for the RM), "
        f"{p['held_out']} held-out verified pairs from the task's eval prompts. "
        f"RM {d.get('rm_steps', '-')} steps in {_f(d.get('rm_train_s'), 0)} s"
    )
    if dpo is not None:
        note += f"; DPO greedy accuracy {_f(dpo['initial'])} -> {_f(dpo['final'])} in {_f(dpo['train_s'], 0)} s"
    load = f"Load average {d['loadavg_start'][0]:.1f} at the start, {d['loadavg_end'][0]:.1f} at the end"
    return _rows(["", "measured", "goal"], rows) + note + f". {load}.\n"


def rlhf_runs() -> str:
    """Every RL-against-a-reward-model run of tests/bench/rlhf.py (results/rlhf*.json), one row each."""
    rows = []
    for path in sorted(RESULTS.glob("rlhf*.json")):
        d = json.loads(path.read_text())
        rl = d.get("rl")
        if rl is None:
            continue
        base = d.get("rm_base")
        trunk = f"{base['params'] / 1e6:.1f}M SFT trunk" if isinstance(base, dict) else "the policy's trunk"
        kl = ", ".join(f"{k} {v}" for k, v in (rl.get("kl") or {}).items() if v is not None) or "-"
        rows.append(
            [
                path.name,
                f"{_f(d['rm_pairwise_accuracy'])} ({trunk})",
                d.get("rl_arm") or "grpo",
                kl,
                str(rl["learner_steps"]),
                f"{_f(rl['eval_accuracy_initial'])} -> {_f(rl['eval_accuracy_final'])} "
                f"({_f(rl['eval_accuracy_best'])})",
                _points(rl["eval_accuracy_final"] - rl["eval_accuracy_initial"]),
            ]
        )
    header = ["results file", "RM held-out acc.", "RL", "KL to the reference", "learner steps"]
    return _rows([*header, "gold: start -> end (best)", "gain (points)"], rows)


def spine_summary() -> str:
    """The user's guide's short form of `spine`."""
    d = _load("spine")
    ours, trl = d["ours"], d["trl"]
    first, mean3 = d["seconds_to_gain"]["+20"], d["seconds_to_gain_3eval_mean"]["+20"]
    rows = [
        ["held-out accuracy after the cold start", _f(ours["eval_accuracy_initial"]), _f(trl["initial_accuracy"])],
        [
            f"held-out accuracy after {ours['rl_wall_s']:.0f} s of RL",
            f"**{_f(ours['eval_accuracy_final'])}** (best {_f(ours['eval_accuracy_best'])})",
            "stops at +20 points",
        ],
        [
            "RL seconds to +20 points (first eval / mean of 3 evals)",
            f"{_f(first['ours'], 1)} / {_f(mean3['ours'], 1)}",
            f"{_f(first['trl'], 1)} / {_f(mean3['trl'], 1)}",
        ],
        ["learner steps", str(ours["learner_steps"]), f"{trl['steps']} to +20"],
    ]
    return _rows(["", "Flywheel", "TRL GRPO"], rows)


def byo_model() -> str:
    """The built-in BPE model on a reasoning-gym task, cold start then RL, inside one budget."""
    d = _load("byo_model")
    reach = d["rl_seconds_to_gain"]
    rows = [
        ["held-out accuracy after the cold start", _f(d["eval_accuracy_initial"])],
        [
            "held-out accuracy at the end of RL (best eval)",
            f"**{_f(d['eval_accuracy_final'])}** ({_f(d['eval_accuracy_best'])})",
        ],
        ["gain", f"{d['gain_points']:+.1f} points"],
        *(
            [f"RL seconds to {k} (first eval / mean of 3)", f"{_f(v['first_eval_s'], 0)} / {_f(v['mean3_s'], 0)}"]
            for k, v in reach.items()
        ),
        [
            "whole job: model build + cold start / RL / wall (budget)",
            f"{d['model_build_and_cold_start_s']:.0f} s / {d['rl_wall_s']:.0f} s / {d['wall_s']:.0f} s "
            f"({d['wall_s_budget']:.0f} s)",
        ],
        ["learner steps", str(d["learner_steps"])],
    ]
    return _rows(["", "bpe_reasoning_cpu.yaml"], rows) + (
        f"\nLoad average before / after: {d['load_average_before'][0]:.1f} / {d['load_average_after'][0]:.1f}.\n"
    )


def chaos_summary() -> str:
    """The user's guide's short form of `chaos`."""
    d = _load("chaos")
    rows = [
        [
            f"seed {d['seed']}: kill -9 of {d['kills_worker']} rollout worker, {d['kills_shard']} replay shard, "
            f"{d['kills_driver']} driver (+ --resume)",
            f"{d['prompts_drawn']} prompts drawn, {d['prompts_reissued'] + d['prompts_requeued_at_resume']} "
            f"re-issued, {d['prompts_lost']} lost, {d['prompts_inserted_twice']} inserted twice; "
            f"{d['groups_acknowledged']} groups acknowledged, {d['groups_lost']} lost; "
            f"{d['learner_steps']} steps, policy_version monotone",
        ]
    ]
    return _rows(["chaos test (tests/e2e/test_chaos.py)", "audit from what the run left on disk"], rows)


def reasoning() -> str:
    d = _load("reasoning")
    names = list(d["systems"])

    def cell(key: str, digits: int) -> list[str]:
        out = []
        for n in names:
            c = d["systems"][n]["summary"][key]
            out.append(f"{_f(c['mean'], digits)} ({_f(c['min'], digits)}-{_f(c['max'], digits)})")
        return out

    rows = [
        ["RL s to +10 points (first eval / 3-eval mean)"]
        + [f"{a} / {b}" for a, b in zip(cell("seconds_to_+10_first", 0), cell("seconds_to_+10_mean3", 0))],
        ["RL s to +20 points (first eval / 3-eval mean)"]
        + [f"{a} / {b}" for a, b in zip(cell("seconds_to_+20_first", 0), cell("seconds_to_+20_mean3", 0))],
        ["accuracy after cold start", *cell("initial_accuracy", 3)],
        [f"accuracy after {d['rl_s']:g} s of RL", *cell("final_accuracy", 3)],
        ["generated tokens/s", *cell("generated_tokens_per_s", 0)],
        ["learner tokens/s", *cell("learner_tokens_per_s", 0)],
    ]
    parts = sorted({k for n in names for k in d["systems"][n]["summary"]["time_share"]})
    for part in parts:
        shares = [d["systems"][n]["summary"]["time_share"].get(part) for n in names]
        rows.append([f"share of RL time: {part.removesuffix('_s')}", *[_f(v, 2) for v in shares]])
    speed = [
        f"{k}: {_f(d[k]['value'], 2)}x" + (f" ({d[k]['reason']})" if d[k]["reason"] else "")
        for k in ("speedup_vs_trl", "speedup_async_vs_sync")
    ]
    return _rows(["seed mean (min-max)", *names], rows) + (
        f"\n{'; '.join(speed)}. Seeds {d['seeds']}, {d['rl_s']:g} s of RL per system and seed; load average "
        f"{d['loadavg_before'][0]:.1f} before, {d['loadavg_after'][0]:.1f} after.\n"
    )


TABLES: dict[str, Callable[[], str]] = {
    "spine_summary": spine_summary,
    "chaos_summary": chaos_summary,
    "rlhf": rlhf,
    "rlhf_runs": rlhf_runs,
    "spine": spine,
    "staleness": staleness,
    "replay": replay,
    "replay_durability": replay_durability,
    "weight_sync": weight_sync,
    "learner": learner,
    "dataflow": dataflow,
    "chaos": chaos,
}
if (RESULTS / "byo_model.json").exists():  # tests/bench/byo_model.py has been run
    TABLES["byo_model"] = byo_model
for _name in ("schedule_free", "process_rewards", "distill"):
    if (RESULTS / f"{_name}.json").exists():
        TABLES[_name] = ab(_name)
if (RESULTS / "reasoning.json").exists():  # tests/bench/reasoning.py has been run
    TABLES["reasoning"] = reasoning
for _name in ("tiny", "reasoning"):
    if (RESULTS / f"passk_{_name}.json").exists():
        TABLES[f"passk_{_name}"] = passk(_name)


def render_readme(text: str) -> str:
    def body(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise KeyError(f"a README has a block table:{name}; tests/bench/tables.py has no such table")
        return m.group(1) + TABLES[name]() + m.group(4)

    return BLOCK.sub(body, text)


if __name__ == "__main__":
    for doc in DOCS:
        doc.write_text(render_readme(doc.read_text()))
        sys.stdout.write(f"rewrote the generated tables of {doc}\n")
