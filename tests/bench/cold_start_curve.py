"""Cold-start calibration: held-out greedy accuracy against SFT step for any driver config, in one run.

    .venv/bin/python tests/bench/cold_start_curve.py --config deploy/configs/reasoning_cpu.yaml \
        [--every 25] [--eval-size 50] [--threads 2] [--out runs/cold_start_curve.jsonl] [overrides ...]

A research tool like recipe_probe.py, for the driver's own path: the config's base model (built-in or
`model.path`), task, renderer and `cold_start` section, trained by `learner.sft.train_sft` on `training_examples`
exactly as `services.driver` would, with a greedy held-out eval (`rollout.evaluation.greedy_accuracy`, the first
`--eval-size` problems of the task's eval split, `rollout.max_new_tokens`) every `--every` steps and two
sample completions printed, so a user picks `cold_start.steps` (and the task's difficulty) that leave RL the
headroom they want. Mid-run points share one cosine schedule over `cold_start.steps`, so they are not the
end points of shorter cold starts; confirm the pick with a driver run. With `--save` the final model goes
where the driver keeps this config's cold start (`services.driver.cold_start_dir`, same cache key), so a driver
run or benchmark on the same config and overrides starts from it instead of training it again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from learner.sft import cache_key, save_cold_start, train_sft, training_examples  # noqa: E402
from rollout.evaluation import greedy_accuracy, greedy_generate  # noqa: E402
from rollout.render import Renderer  # noqa: E402
from rollout.tasks import make_task  # noqa: E402
from services.config import load_config  # noqa: E402
from services.driver import cold_start_dir  # noqa: E402
from services.preflight import build_base_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--every", type=int, default=25, help="evaluate every this many SFT steps")
    ap.add_argument("--eval-size", type=int, default=50, help="held-out problems per eval (the eval split's first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per eval here")
    ap.add_argument("--save", action="store_true", help="keep the final model as the driver's cold start")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. cold_start.lr=5e-4")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.cold_start is None:
        sys.exit(f"{args.config} has no cold_start section; nothing to calibrate")
    torch.set_num_threads(args.threads)
    base = build_base_model(cfg, Path(cfg.run.cache_dir).resolve())
    renderer = Renderer.from_pretrained(cfg.render, base)
    task = make_task(cfg.task, renderer)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    sft, evals, max_new = cfg.cold_start, task.eval_set()[: args.eval_size], cfg.rollout.max_new_tokens
    sample = list(itertools.islice(training_examples(task, sft), 200))
    lengths = [len(renderer.target_ids(p, c)) for p, c in sample]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"# {params:.1f}M parameters; {sft}; target tokens mean {sum(lengths) / len(lengths):.0f} max {max(lengths)}")
    print(f"# e.g. {sample[0][0].prompt!r} -> {sample[0][1]!r}", flush=True)
    clock = {"train_s": 0.0, "since": time.perf_counter()}

    def on_step(step: int, loss: float) -> None:
        if step % args.every and step != sft.steps:
            return
        clock["train_s"] += time.perf_counter() - clock["since"]
        acc = greedy_accuracy(model, renderer, evals, max_new, task.score)
        pad = renderer.tokenizer.pad_token_id
        outs = greedy_generate(
            model, [renderer.encode_prompt(p) for p in evals[:2]], renderer.stop.token_ids, pad, max_new
        )
        model.train()
        row = {"step": step, "loss": round(loss, 4), "greedy_accuracy": acc, "train_s": round(clock["train_s"], 1)}
        print(f"step {step:5d}  loss {loss:.3f}  greedy {acc:.3f}  train_s {clock['train_s']:7.0f}", flush=True)
        for p, o in zip(evals[:2], outs):
            print(f"    {p.prompt[-40:]!r} -> {renderer.completion_text(o)!r}", flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps({"config": args.config, "overrides": args.overrides, **row}) + "\n")
        clock["since"] = time.perf_counter()

    losses = train_sft(model, renderer, training_examples(task, sft), sft, on_step=on_step)
    if args.save:
        out = cold_start_dir(cfg, base, Path(cfg.run.cache_dir).resolve())
        save_cold_start(model, renderer, out, cache_key(base, task, sft, cfg.render), losses[-1])
        print(f"# saved as the driver's cold start for this config: {out}")


if __name__ == "__main__":
    main()
