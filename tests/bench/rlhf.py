"""RLHF end to end on a task with a gold verifier: pairs -> reward model -> RL against it, and DPO on the same pairs.

    .venv/bin/python -m tests.bench.rlhf [--rm-steps 700] [--rm-lr 1e-4] [--rm-pairs verified|all]
        [--rm-max-s 900] [--rl-wall-s 540] [--dpo-steps 150] [--pairs-from runs/bench-rlhf]
        [--rm-from runs/bench-rlhf/reward_model] [--skip-rl] [--skip-dpo] [--seed 0] [--critic off|head|rm]
        [--rm-base-set cold_start.steps=1500 ...] [--rl-set learner.objective.kl_ref_coef=0.1 ...] [--out results.json]

1. The tiny_cpu policy after its cold start samples 8 completions per prompt (train prompts, and the task's
   held-out prompts); pairs: chosen = verified correct, rejected = wrong, plus wrong-vs-wrong pairs ranked by
   a graded gold score (characters in the right place). Held-out pairs come from the held-out prompts only.
2. A reward model (that policy's trunk + scalar head) trains on the train pairs (`--rm-pairs verified`: only
   correct-vs-wrong pairs; the graded wrong-vs-wrong pairs carry a weak, noisy signal): held-out pairwise
   accuracy on the held-out verified pairs. `--pairs-from` reuses the pairs of an earlier run (sampling is slow).
   `--rm-base-set` starts the RM from another trunk built the driver's way from those overrides (a longer cold
   start, a larger built-in model; same tokenizer), as RLHF pipelines start the RM from their best SFT model:
   the policy's cold start is deliberately short, and an RM on its trunk must first learn the task from pairs.
3. RL (deploy/configs/rlhf_tiny_cpu.yaml: GRPO, reward = the reward model alone, KL to the reference) from
   the same policy: gold gain = held-out greedy accuracy (the verifier) final − initial, within the wall budget.
   `--critic head|rm` runs PPO with GAE instead (the four-model setup): `head` a value head on the policy's
   trunk (deploy/configs/rlhf_ppo_tiny_cpu.yaml), `rm` a separate critic initialised from the same reward model
   (deploy/configs/rlhf_ppo_critic_tiny_cpu.yaml); such a run writes tests/bench/results/rlhf_ppo_<arm>.json.
4. DPO from the same policy on the same pairs: gold gain on the same held-out problems, same greedy eval.
Writes tests/bench/results/rlhf.json (rm_pairwise_accuracy, rl_gold_gain, dpo_gold_gain, ...) and the
gold-vs-proxy figure (runs/bench-rlhf-rl/rlhf.png, copied to tests/bench/results/rlhf_gold_vs_proxy.png), or
with `--out X.json`, X.json and X.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "bench" / "results"
CONFIG = "deploy/configs/rlhf_tiny_cpu.yaml"
# the RL phase by --critic: GRPO (no values), PPO/GAE with a value head, PPO/GAE with a critic from the RM
RL_CONFIGS = {
    "off": CONFIG,
    "head": "deploy/configs/rlhf_ppo_tiny_cpu.yaml",
    "rm": "deploy/configs/rlhf_ppo_critic_tiny_cpu.yaml",
}


def _encode(rows, renderer, max_tokens: int) -> list:
    """Rendered pairs, each (prompt, chosen, rejected) once: the task's prompts recur in the sampled stream."""
    from rollout.preferences import PreferenceDataConfig, dedupe_pairs, encode_pair, row_pair

    cfg = PreferenceDataConfig(path="-", margin_key="margin")
    return dedupe_pairs([encode_pair(renderer, *row_pair(r, cfg), max_tokens) for r in rows])


def make_pairs(cfg, model_dir: Path, out_dir: Path, n_train_prompts: int, seed: int):
    from rollout.engine import make_engine
    from rollout.preference_sampling import char_match, sampled_preference_rows
    from rollout.render import Renderer
    from rollout.tasks import make_task

    renderer = Renderer.from_pretrained(cfg.render, model_dir)
    task = make_task(cfg.task, renderer)
    engine = make_engine(cfg.rollout, model_dir, renderer.stop)
    stream = task.train_stream(seed=seed + 7)
    train_problems = [next(stream) for _ in range(n_train_prompts)]
    rows = {}
    for name, problems in (("train", train_problems), ("eval", task.eval_set())):
        rows[name] = sampled_preference_rows(
            engine, renderer, problems, task.score, n=8, seed=seed, graded=char_match, max_pairs_per_prompt=4
        )
        (out_dir / f"pairs_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
    engine.shutdown()  # frees its memory before the RL run starts its own engine
    return task, renderer, _encode(rows["train"], renderer, 64), _encode(rows["eval"], renderer, 64)


def load_pairs(cfg, model_dir: Path, pairs_dir: Path):
    """Reuse pairs written by an earlier `make_pairs` (same policy, same prompts): sampling is the slow part."""
    from rollout.render import Renderer
    from rollout.tasks import make_task

    renderer = Renderer.from_pretrained(cfg.render, model_dir)
    task = make_task(cfg.task, renderer)
    rows = {n: [json.loads(line) for line in (pairs_dir / f"pairs_{n}.jsonl").open()] for n in ("train", "eval")}
    return task, renderer, _encode(rows["train"], renderer, 64), _encode(rows["eval"], renderer, 64)


def train_rm(model_dir: Path, train, held, steps: int, lr: float, out_dir: Path, seed: int, max_s: float):
    from learner.reward_model import RewardModelTrainConfig, init_reward_model, save_reward_model, train_reward_model

    cfg = RewardModelTrainConfig(
        steps=steps,
        pairs_per_step=32,
        lr=lr,
        warmup_steps=10,
        eval_every_steps=max(1, steps // 12),
        seed=seed,
        max_wall_s=max_s,
    )
    model = init_reward_model(model_dir, seed=seed)
    curve = []
    t0 = time.perf_counter()
    final = train_reward_model(model, train, held, cfg, on_metrics=lambda s, r: curve.append({"step": s, **r}))
    path = save_reward_model(model, model_dir, out_dir / "reward_model")
    return final, time.perf_counter() - t0, path, [c for c in curve if "rm/eval_pairwise_accuracy" in c]


def accuracy_by_first_difference(rm_path: Path, pairs, renderer) -> dict[str, dict]:
    """Held-out pairwise accuracy grouped by the first character where chosen and rejected differ.

    With reversed answers, position 0 is the units digit (no carry needed), 1 the tens (needs the carry):
    an RM that only checks the easy digit is right on the first group and at chance on the rest.
    """
    import torch

    from learner.preference_losses import pairwise_accuracy
    from learner.reward_model import init_reward_model, pair_rewards

    model = init_reward_model(rm_path).eval()
    groups: dict[int, list] = {}
    for p in pairs:
        c, r = renderer.completion_text(p.chosen_ids), renderer.completion_text(p.rejected_ids)
        first = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
        groups.setdefault(first, []).append(p)
    out = {}
    with torch.no_grad():
        for first, group in sorted(groups.items()):
            chosen, rejected = pair_rewards(model, group)
            out[str(first)] = {"pairs": len(group), "accuracy": pairwise_accuracy(chosen, rejected)}
    return out


def evaluate_rm(rm_path: Path, pairs) -> float:
    from learner.reward_model import evaluate_reward_model, init_reward_model

    return evaluate_reward_model(init_reward_model(rm_path), pairs)["rm/eval_pairwise_accuracy"]


def run_rl(rm_path: Path, wall_s: float, seed: int, critic: str = "off", overrides: tuple[str, ...] = ()) -> dict:
    name = "bench-rlhf-rl" if critic == "off" else f"bench-rlhf-ppo-{critic}"
    cmd = [
        sys.executable, "-m", "services.driver", "--config", RL_CONFIGS[critic], f"run.name={name}",
        f"reward.model.path={rm_path}", f"run.max_wall_s={wall_s}", "run.progress=false", f"rollout.seed={seed}",
    ]  # fmt: skip
    if critic == "rm":
        cmd.append(f"learner.critic.path={rm_path}")
    cmd += overrides
    shutil.rmtree(ROOT / "runs" / name, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"RL run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((ROOT / "runs" / name / "summary.json").read_text())
    objective = json.loads((ROOT / "runs" / name / "config.json").read_text())["learner"]["objective"]
    kl = {k: objective.get(k) for k in ("kl_ref_coef", "kl_ref_target", "kl_ref_in")}
    return {**summary, "kl": kl, "job_s": time.perf_counter() - t0, "run_dir": str(ROOT / "runs" / name)}


def run_dpo(model_dir: Path, task, renderer, train, held, steps: int, seed: int, max_new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    from learner.dpo import DPOConfig, train_dpo
    from rollout.evaluation import greedy_accuracy

    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = copy.deepcopy(policy)
    problems = task.eval_set()
    before = greedy_accuracy(policy, renderer, problems, max_new_tokens, task.score)
    cfg = DPOConfig(steps=steps, pairs_per_step=32, lr=5e-5, beta=0.1, eval_every_steps=max(1, steps // 3), seed=seed)
    t0 = time.perf_counter()
    final = train_dpo(policy, reference, train, held, cfg, pad_id=renderer.tokenizer.pad_token_id or 0)
    after = greedy_accuracy(policy, renderer, problems, max_new_tokens, task.score)
    return {"initial": before, "final": after, "gain": after - before, "train_s": time.perf_counter() - t0, **final}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rm-steps", type=int, default=700)
    ap.add_argument("--rl-wall-s", type=float, default=540.0)
    ap.add_argument("--dpo-steps", type=int, default=150)
    ap.add_argument("--train-prompts", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rm-lr", type=float, default=1e-4)
    ap.add_argument("--rm-max-s", type=float, default=900.0, help="RM training stops here even before --rm-steps")
    ap.add_argument("--rm-pairs", choices=("verified", "all"), default="verified")
    ap.add_argument("--pairs-from", type=Path, default=None, help="reuse pairs_{train,eval}.jsonl from this directory")
    ap.add_argument("--rm-from", type=Path, default=None, help="reuse a reward model this bench trained earlier")
    ap.add_argument(
        "--rm-base-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides that build the reward model's trunk (the driver's base model + cold start) instead of "
        "the policy's, e.g. a longer cold start or a larger model: cold_start.steps=1500 model.hidden_size=256",
    )
    ap.add_argument(
        "--rl-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for the RL run, e.g. learner.objective.kl_ref_coef=0.1",
    )
    ap.add_argument("--out", type=Path, default=None, help="results file (default results/rlhf.json or _ppo_<arm>)")
    ap.add_argument("--skip-rl", action="store_true")
    ap.add_argument("--skip-dpo", action="store_true")
    ap.add_argument(
        "--critic",
        choices=tuple(RL_CONFIGS),
        default="off",
        help="RL phase: off = GRPO; head = PPO/GAE with a value head; rm = PPO/GAE with a critic from the RM",
    )
    args = ap.parse_args()
    out_json = args.out or RESULTS / ("rlhf.json" if args.critic == "off" else f"rlhf_ppo_{args.critic}.json")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from rollout.preferences import verified_pairs
    from services.config import load_config
    from services.driver import prepare_model

    cfg = load_config(CONFIG, ["run.name=bench-rlhf", "run.progress=false"])
    out_dir = ROOT / "runs" / "bench-rlhf"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir, _ = prepare_model(cfg, (ROOT / cfg.run.cache_dir).resolve())
    if args.pairs_from is not None:
        task, renderer, train, held = load_pairs(cfg, model_dir, args.pairs_from)
    else:
        task, renderer, train, held = make_pairs(cfg, model_dir, out_dir, args.train_prompts, args.seed)
    pairs_s = time.perf_counter() - t0
    all_train = train
    # The product's filter (services.train_rm with rm_training.verified_only=true): chosen verified correct,
    # rejected verified wrong. Held-out accuracy is always on verified pairs, the question RL asks of the RM.
    held_verified = verified_pairs(held, renderer, task.score).kept
    if args.rm_pairs == "verified":
        train = verified_pairs(train, renderer, task.score).kept
    result = {
        "task": "2-digit addition, reversed_padded answers, tiny char Llama after cold start (deploy/configs/tiny_cpu)",
        "load_note": "2-core box; the load averages at the start and end are in loadavg_start / loadavg_end",
        "loadavg_start": os.getloadavg(),
        "pairs": {
            "train_all": len(all_train),
            "rm_train": len(train),
            "rm_train_kind": args.rm_pairs,
            "held_out": len(held_verified),
            "rm_train_prompts": len({p.problem.prompt for p in train}),
            "held_out_prompts": len({p.problem.prompt for p in held_verified}),
            "build_s": pairs_s,
            "reused_from": None if args.pairs_from is None else str(args.pairs_from),
        },
        "goals": {"rm_pairwise_accuracy": 0.90, "rl_gold_gain": 0.15, "rl_wall_s": 900},
        "rm_pairwise_accuracy": None,
        "rl_gold_gain": None,
        "dpo_gold_gain": None,
    }

    def save() -> None:  # after each phase, with the load average at that moment
        result["loadavg_end"] = os.getloadavg()
        out_json.write_text(json.dumps(result, indent=1))

    # held-out accuracy on verified pairs (correct vs wrong): the question the RL reward has to answer
    if args.rm_from is None:
        rm_base, rm_base_info = model_dir, {"rm_base": "the policy (its cold start)"}
        if args.rm_base_set:
            from tests.bench.ab_runs import cold_started_model

            rm_base, trunk = cold_started_model(CONFIG, ["run.name=bench-rlhf-rm-base", *args.rm_base_set])
            rm_base_info = {"rm_base": trunk}
        rm_final, rm_s, rm_path, rm_curve = train_rm(
            rm_base, train, held_verified, args.rm_steps, args.rm_lr, out_dir, args.seed, args.rm_max_s
        )
        record = {
            "rm_pairwise_accuracy": rm_final["rm/eval_pairwise_accuracy"],
            "rm_reward_gap": rm_final["rm/eval_reward_gap"],
            "rm_train_s": rm_s,
            "rm_steps": rm_curve[-1]["step"],
            "rm_max_s": args.rm_max_s,
            "rm_lr": args.rm_lr,
            "rm_curve": rm_curve,
            **rm_base_info,
        }
        (rm_path / "bench_rm_train.json").write_text(json.dumps(record, indent=1))
    else:  # an RM trained by an earlier run of this bench on the same pairs: its record, re-evaluated here
        rm_path = args.rm_from.resolve()
        record = json.loads((rm_path / "bench_rm_train.json").read_text()) | {"rm_reused_from": str(rm_path)}
        record |= {"rm_pairwise_accuracy_reevaluated": evaluate_rm(rm_path, held_verified)}
    result |= record | {
        "rm_accuracy_by_first_difference": accuracy_by_first_difference(rm_path, held_verified, renderer)
    }
    save()
    rl = None if args.skip_rl else run_rl(rm_path, args.rl_wall_s, args.seed, args.critic, tuple(args.rl_set))
    result["rl_overrides"] = args.rl_set
    result["rl_arm"] = {"off": "grpo", "head": "ppo_gae_value_head", "rm": "ppo_gae_critic_from_rm"}[args.critic]
    result |= {"rl_gold_gain": None if rl is None else rl["eval_accuracy_final"] - rl["eval_accuracy_initial"]}
    result["rl"] = rl
    save()
    dpo = None
    if not args.skip_dpo:
        dpo = run_dpo(model_dir, task, renderer, all_train, held, args.dpo_steps, args.seed, cfg.rollout.max_new_tokens)
        result |= {"dpo_gold_gain": dpo["gain"], "dpo": dpo}
    save()
    if rl is not None and args.critic == "off" and (Path(rl["run_dir"]) / "rlhf.png").exists():
        figure = RESULTS / "rlhf_gold_vs_proxy.png" if args.out is None else out_json.with_suffix(".png")
        shutil.copy(Path(rl["run_dir"]) / "rlhf.png", figure)
    save()
    rows = [
        ("RM held-out pairwise accuracy", f"{result['rm_pairwise_accuracy']:.3f}", ">= 0.90"),
        (
            f"RL gold gain, {result['rl_arm']} (points)",
            "-" if rl is None else f"{100 * result['rl_gold_gain']:+.1f}",
            ">= +15",
        ),
        ("RL job wall (s)", "-" if rl is None else f"{rl['job_s']:.0f}", "<= 900"),
        ("DPO gold gain (points)", "-" if dpo is None else f"{100 * dpo['gain']:+.1f}", "reported"),
    ]
    print(f"{'measure':<32}{'value':>10}  goal")
    for name, value, goal in rows:
        print(f"{name:<32}{value:>10}  {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
