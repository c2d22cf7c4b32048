"""`python -m services.train_dpo --config deploy/configs/preferences/rm_tiny_cpu.yaml [dpo.kind=ipo ...]`.

DPO (or IPO / conservative DPO, `dpo.kind`) on the same preference data as reward-model training, from the
policy the RL driver would start from (the run config's model + cold start), against a frozen copy of it.

Contract: the config is `services.train_rm`'s (run sections + `preferences` + `dpo`). Outputs under
`runs/<run.name>/`: `dpo_policy/` (an HF causal LM, usable as `model.path` of an RL run), `metrics.jsonl`
(`dpo/*` per step, held-out preference accuracy and margin), and `dpo_summary.json` with the gold held-out
accuracy before and after: greedy pass@1 with the task's verifier on the task's held-out problems, the same
measure as the RL driver's eval. Exit code 2 on an invalid config or unusable data.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path

from services.config import RunConfig
from services.train_rm import MetricsWriter, PreferenceSections, preference_cli

log = logging.getLogger(__name__)


def train(run_cfg: RunConfig, sections: PreferenceSections) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.dpo import train_dpo
    from rollout.evaluation import greedy_accuracy
    from rollout.preferences import load_preferences
    from rollout.render import Renderer
    from rollout.tasks import make_task
    from services.driver import prepare_model

    run_dir = Path(run_cfg.run.runs_dir) / run_cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    start, _ = prepare_model(run_cfg, Path(run_cfg.run.cache_dir).resolve())
    renderer = Renderer.from_pretrained(run_cfg.render, start)
    data = load_preferences(sections.preferences, renderer)
    task = make_task(run_cfg.task, renderer)
    policy = AutoModelForCausalLM.from_pretrained(start)
    reference = copy.deepcopy(policy)
    gold = task.eval_set()
    max_new = run_cfg.rollout.max_new_tokens
    before = greedy_accuracy(policy, renderer, gold, max_new, task.score)
    writer = MetricsWriter(run_cfg, run_dir, {"run": run_cfg.model_dump(mode="json"), **sections.model_dump()})
    t0 = time.perf_counter()
    pad = renderer.tokenizer.pad_token_id or 0
    final = train_dpo(policy, reference, data.train, data.eval, sections.dpo, pad, on_metrics=writer)
    after = greedy_accuracy(policy, renderer, gold, max_new, task.score)
    out = run_dir / "dpo_policy"
    policy.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(start).save_pretrained(out)
    summary = {
        **final,
        "gold_accuracy_initial": before,
        "gold_accuracy_final": after,
        "gold_gain": after - before,
        "train_pairs": len(data.train),
        "eval_pairs": len(data.eval),
        "skipped_rows": data.skipped,
        "train_s": time.perf_counter() - t0,
        "policy": str(out.resolve()),
    }
    writer.close(summary)
    (run_dir / "dpo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    return preference_cli(argv, __doc__, train, "preferences and dpo", "dpo.kind=ipo dpo.beta=0.5")


if __name__ == "__main__":
    sys.exit(main())
