"""Command line: write a teacher's verified solutions for a run config's task as a cold-start JSONL.

    python -m services.distill_offline --config deploy/configs/tiny_cpu.yaml --teacher runs/x/final_model \
        --out data/teacher.jsonl --problems 4000 --samples 4 [dotted overrides...]

Then train the student with `cold_start.solutions_path=data/teacher.jsonl` (offline distillation: SFT on the
teacher's samples, then RL). The teacher is served by the config's rollout engine (`rollout.engine`); the
student's renderer (`model` / `render` of the config) frames the prompts and reads the completions.
Exit code 2 on a bad config or path.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--teacher", required=True, help="a local HF model dir (e.g. an earlier run's final_model)")
    ap.add_argument("--out", required=True, help="the JSONL to write")
    ap.add_argument("--problems", type=int, default=2000, help="training problems to ask the teacher")
    ap.add_argument("--samples", type=int, default=4, help="teacher samples per problem (first verified one kept)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from services.config import ConfigError, load_config

    teacher = Path(args.teacher).expanduser()
    try:
        cfg = load_config(args.config, args.overrides)
        if not (teacher / "config.json").is_file():
            raise ConfigError(f"--teacher {str(teacher)!r} holds no config.json; give a saved HF model directory")
        if args.problems < 1 or args.samples < 1:
            raise ConfigError("--problems and --samples must be >= 1")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from rollout.distill import teacher_solutions, write_solutions
    from rollout.engine import make_engine
    from rollout.render import Renderer
    from rollout.tasks import make_task

    renderer = Renderer.from_pretrained(cfg.render, teacher)
    task = make_task(cfg.task, renderer)
    engine = make_engine(cfg.rollout, teacher, renderer.stop)
    problems = list(itertools.islice(task.train_stream(seed=cfg.task.seed * 1000 + 999), args.problems))
    rows, stats = teacher_solutions(engine, renderer, task, problems, args.samples, seed=cfg.rollout.seed)
    write_solutions(rows, args.out)
    print(json.dumps({"out": args.out, "rows": len(rows), **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
