"""`python -m services.evaluate`: pass@k curves of one or more models on a run config's task.

    python -m services.evaluate --config deploy/configs/tiny_cpu.yaml \
        --model @coldstart --model runs/tiny-cpu/final_model [--label cold --label rl] \
        [--n 64] [--k 1,2,4,8,16,32,64] [--temperature 1.0] [--workers N] [--address ADDR] [--out DIR]

For each model: greedy pass@1, and from n samples per prompt at the temperature: unbiased pass@k,
mean@k and maj@k for every k (rollout/passk.py), on the task's eval split with the task's verifier and
the config's rollout engine (vLLM or HF). `@coldstart` names the config's starting model (built and
cold-started as the driver would, cached). Without `--workers` the engine runs in this process; with
`--workers N`, N Ray actors with the rollout workers' resource spec share the batches (a local Ray, or
`--address`). Writes `<out>/passk.json` and `<out>/passk.png` (every model on one figure).
Exit codes: 0 done, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from rollout import passk
from rollout.sampled_eval import BatchEvaluator, EvalBatch, PromptOutcome, make_batches
from services.config import ConfigError, RunConfig, load_config

COLD_START = "@coldstart"


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k {text!r}: give comma-separated integers, e.g. 1,2,4,8") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--k {text!r}: every k must be >= 1")
    return ks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m services.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="run config whose task, eval split and rollout engine to use")
    ap.add_argument("--model", action="append", required=True, help=f"HF model dir, or {COLD_START}; repeatable")
    ap.add_argument("--label", action="append", default=[], help="legend name per --model (default: from the path)")
    ap.add_argument("--n", type=int, default=64, help="samples per prompt (default 64)")
    ap.add_argument("--k", type=_ks, default=None, help="k values, comma-separated (default 1,2,4,...,n)")
    ap.add_argument("--temperature", type=float, default=None, help="sampling temperature (default rollout's)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus mass (default rollout's)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="completion budget (default rollout's)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first LIMIT eval prompts")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (results depend on seed and batch size)")
    ap.add_argument("--batch-sequences", type=int, default=1024, help="sequences per engine call (prompts x n)")
    ap.add_argument("--no-greedy", action="store_true", help="skip the greedy pass@1 decode")
    ap.add_argument("--workers", type=int, default=0, help="Ray actors to spread batches over (0 = in-process)")
    ap.add_argument("--address", default=None, help="Ray address for --workers (default: a local Ray)")
    ap.add_argument("--out", default=None, help="output dir (default runs/eval/<run.name>)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. task.eval_size=100")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.label and len(args.label) != len(args.model):
        ap.error(f"got {len(args.label)} --label for {len(args.model)} --model; give one per model or none")
    if args.n < 1 or args.workers < 0 or (args.limit is not None and args.limit < 1):
        ap.error("--n and --limit must be >= 1 and --workers >= 0")
    args.k = args.k or passk.default_ks(args.n)
    if args.k[-1] > args.n:
        ap.error(f"--k {args.k[-1]} exceeds --n {args.n}: pass@k needs at least k samples per prompt")
    return args


def eval_rollout_config(cfg: RunConfig, args: argparse.Namespace):
    """The run's rollout section with the evaluation's sampling settings."""
    update = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    update = {k: v for k, v in update.items() if v is not None} | {"seed": args.seed}
    return type(cfg.rollout).model_validate(cfg.rollout.model_dump() | update)


def resolve_models(cfg: RunConfig, specs: list[str], labels: list[str]) -> list[tuple[str, Path]]:
    """(label, model dir) per --model; `@coldstart` is built (or found in the cache) as the driver does."""
    out = []
    for i, spec in enumerate(specs):
        if spec == COLD_START:
            from services.driver import prepare_model

            path, _ = prepare_model(cfg, Path(cfg.run.cache_dir).resolve())
            label = "cold start"
        else:
            path = Path(spec).expanduser()
            if not (path / "config.json").exists():
                raise ConfigError(f"--model {spec!r} holds no config.json: give an HF model dir or {COLD_START}")
            label = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
        out.append((labels[i] if labels else label, path))
    return out


def evaluate_model(cfg: RunConfig, rollout_cfg, model_dir: Path, batches: list[EvalBatch], args) -> list:
    """Every batch's `PromptOutcome`s, in prompt order: in this process, or on `args.workers` Ray actors."""
    if args.workers == 0:
        core = BatchEvaluator(rollout_cfg, cfg.task, model_dir, cfg.render, cfg.reward.function)
        try:
            outcomes = [o for b in batches for o in core.evaluate(b)]
        finally:
            core.shutdown()
    else:
        from services.eval_worker import run_on_workers, start_eval_workers, stop_workers

        workers = start_eval_workers(cfg, rollout_cfg, str(model_dir), args.workers, Path(cfg.run.cache_dir).resolve())
        try:
            outcomes = run_on_workers(workers, batches)
        finally:
            stop_workers(workers)
    return sorted(outcomes, key=lambda o: o.prompt_index)


def model_result(label: str, path: Path, outcomes: list[PromptOutcome], ks: list[int], wall_s: float) -> dict:
    """The JSON record of one model: the curve, greedy pass@1, throughput and per-prompt correct counts."""
    greedy = [o.greedy_score for o in outcomes if o.greedy_score is not None]
    tokens = sum(o.sampled_tokens for o in outcomes)
    samples = sum(len(o.scores) for o in outcomes)
    return {
        "label": label,
        "path": str(path),
        "greedy_pass_at_1": sum(greedy) / len(greedy) if greedy else None,
        "curve": [dataclasses.asdict(p) for p in passk.curve([o.samples() for o in outcomes], ks)],
        "wall_s": wall_s,
        "sampled_tokens": tokens,
        "sampled_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "truncated_fraction": sum(o.truncated for o in outcomes) / samples,
        "correct_per_prompt": [o.samples().correct for o in outcomes],
        "greedy_score_per_prompt": [o.greedy_score for o in outcomes],
    }


def evaluate_and_report(cfg: RunConfig, rollout_cfg, label: str, path: Path, batches: list[EvalBatch], args) -> dict:
    t0 = time.perf_counter()
    outcomes = evaluate_model(cfg, rollout_cfg, path, batches, args)
    result = model_result(label, path, outcomes, args.k, time.perf_counter() - t0)
    print(f"{label}: greedy pass@1 {result['greedy_pass_at_1']}, {result['wall_s']:.1f}s", flush=True)
    return result


def _settings(cfg: RunConfig, rollout_cfg, args, num_prompts: int) -> dict:
    return {
        "config": args.config,
        "overrides": args.overrides,
        "task": cfg.task.model_dump(mode="json"),
        "engine": rollout_cfg.engine,
        "n": args.n,
        "ks": args.k,
        "temperature": rollout_cfg.temperature,
        "top_p": rollout_cfg.top_p,
        "max_new_tokens": rollout_cfg.max_new_tokens,
        "seed": args.seed,
        "batch_sequences": args.batch_sequences,
        "num_prompts": num_prompts,
        "workers": args.workers,
        "solved_at": passk.SOLVED_AT,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        rollout_cfg = eval_rollout_config(cfg, args)
        models = resolve_models(cfg, args.model, args.label)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rollout.render import Renderer
    from rollout.tasks import make_task
    from services.passk_plot import draw_passk, format_table, write_results

    # the eval split as the run sees it: sources that skip over-long prompts measure them rendered
    problems = make_task(cfg.task, Renderer.from_pretrained(cfg.render, models[0][1])).eval_set()[: args.limit]
    batches = make_batches(problems, args.n, args.batch_sequences, args.seed, greedy=not args.no_greedy)
    if args.workers:
        from services.driver import start_ray

        start_ray(cfg, args.address)
    try:
        results = [evaluate_and_report(cfg, rollout_cfg, label, path, batches, args) for label, path in models]
    finally:
        if args.workers:
            import ray

            ray.shutdown()
    out = Path(args.out) if args.out else Path(cfg.run.runs_dir) / "eval" / cfg.run.name
    settings = _settings(cfg, rollout_cfg, args, len(problems))
    print(format_table(results))
    print(write_results(out, settings, results), draw_passk(out, settings, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
