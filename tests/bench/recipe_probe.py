"""Recipe probe: tiny model -> SFT cold start -> greedy eval -> on-policy GRPO, timed on one thread.

A research tool (pure torch + transformers; no vLLM, Ray or DeepSpeed): it answers "with these task /
model / SFT / RL settings, how many RL steps, sampled completions and seconds does it take to lift
held-out greedy pass@1 by `--target` points above the post-cold-start accuracy?". It prints a table
(RL step, samples, accuracy, RL wall time excluding eval) and a JSON summary line per run.

RL here: P prompts x G samples at `--temperature` with a KV-cache sampler (behaviour logprobs come
from the sampling pass), binary exact-match reward, group-relative advantages (GRPO; `--adv-std` off
gives Dr. GRPO's mean-only centring), PPO-clipped ratio against the behaviour logprobs, optional k3 KL
to the behaviour policy (Schulman, "Approximating KL divergence"), token-mean loss (DAPO), groups
with zero reward spread dropped before the update (they carry no gradient).

Times are process CPU seconds (`time.process_time`) with `--threads 1`: on a shared 2-core box the
wall clock measures the neighbours; CPU time of a one-thread process is what a dedicated core would take.

  python tests/bench/recipe_probe.py --seeds 0 1 2 --max-rl-s 240
  python tests/bench/recipe_probe.py --sft-curve --sft-steps 600   # accuracy vs SFT step only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from learner.sft import SFTConfig, cold_start, reference_examples, train_sft  # noqa: E402
from learner.tiny_model import TinyModelSpec, build_tiny_model  # noqa: E402
from rollout.evaluation import greedy_accuracy, left_pad  # noqa: E402
from rollout.render import RenderConfig, Renderer  # noqa: E402
from rollout.tasks import ArithmeticTask, TaskConfig  # noqa: E402
from rollout.verifiers import ExactConfig, make_verifier  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    spec, task, sft = TinyModelSpec.model_fields, TaskConfig.model_fields, SFTConfig.model_fields
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--min-digits", type=int, default=task["min_digits"].default)
    a("--max-digits", type=int, default=task["max_digits"].default)
    a("--ops", default="".join(task["ops"].default))
    a("--eval-size", type=int, default=task["eval_size"].default)
    a(
        "--answer-format",
        default="plain",
        choices=["plain", "reversed_padded", "padded_msd"],
        help="task.answer_format; padded_msd (probe-only): zero-padded operands, N+1-digit answer MSD first",
    )
    a("--hidden", type=int, default=spec["hidden_size"].default)
    a("--inter", type=int, default=spec["intermediate_size"].default)
    a("--layers", type=int, default=spec["num_hidden_layers"].default)
    a("--heads", type=int, default=spec["num_attention_heads"].default)
    a("--sft-steps", type=int, default=sft["steps"].default)
    a("--sft-batch", type=int, default=sft["batch_size"].default)
    a("--sft-lr", type=float, default=sft["lr"].default)
    a("--sft-warmup", type=int, default=sft["warmup_steps"].default)
    a("--sft-schedule", default=sft["schedule"].default, choices=["constant", "cosine"])
    a("--sft-curve", action="store_true", help="only train SFT, evaluating every --eval-every steps")
    a("--rl-lr", type=float, default=1e-3)
    a("--group", type=int, default=8, help="G: samples per prompt")
    a("--prompts", type=int, default=16, help="P: prompts per RL step")
    a("--temperature", type=float, default=1.0)
    a("--clip", type=float, default=0.2)
    a("--kl", type=float, default=0.0, help="k3 KL coefficient (to the behaviour policy)")
    a("--updates", type=int, default=1, help="minibatch updates per sampled batch")
    a("--adv-std", type=int, default=1, help="1: divide advantages by the group std (GRPO)")
    a("--max-rl-steps", type=int, default=2000)
    a("--max-rl-s", type=float, default=240.0, help="stop RL after this much RL wall time")
    a("--eval-every", type=int, default=10)
    a("--target", type=float, default=0.20, help="stop when the gain reaches this")
    a("--target-lo", type=float, default=0.20, help="also record the first step with this gain")
    a("--seeds", type=int, nargs="+", default=[0])
    a("--threads", type=int, default=1)
    a("--cache", default="/tmp/flywheel_recipe_cache")
    a("--show-samples", type=int, default=0)
    a("--out", default=None, help="append each run's summary as a JSON line to this file")
    return p.parse_args(argv)


def configs(args, seed: int) -> tuple[TaskConfig, TinyModelSpec, SFTConfig]:
    fmt = "plain" if args.answer_format == "padded_msd" else args.answer_format
    task = TaskConfig(
        min_digits=args.min_digits,
        max_digits=args.max_digits,
        ops=tuple(args.ops),
        eval_size=args.eval_size,
        answer_format=fmt,
    )
    spec = TinyModelSpec(
        alphabet=ArithmeticTask.alphabet,
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        seed=seed,
    )
    sft = SFTConfig(
        steps=args.sft_steps,
        batch_size=args.sft_batch,
        lr=args.sft_lr,
        warmup_steps=args.sft_warmup,
        schedule=args.sft_schedule,
        seed=seed,
    )
    return task, spec, sft


class PaddedMSDTask(ArithmeticTask):
    """Probe-only ablation of `reversed_padded`: same zero padding, answer most-significant digit first."""

    def _make(self, a: int, op: str, b: int):
        p = super()._make(a, op, b)
        n = self.cfg.max_digits
        return type(p)(prompt=f"{a:0{n}d}{op}{b:0{n}d}=", answer=str(a + b).zfill(n + 1), task=p.task)


def make_probe_task(args, task_cfg: TaskConfig) -> ArithmeticTask:
    return PaddedMSDTask(task_cfg) if args.answer_format == "padded_msd" else ArithmeticTask(task_cfg)


def max_answer_tokens(task: ArithmeticTask) -> int:
    """Longest answer + 1 for `<eos>` (a `-` result or a `*` product is longer than a sum)."""
    if task.cfg.answer_format != "plain" or isinstance(task, PaddedMSDTask):
        return task.cfg.max_digits + 2
    hi = 10**task.cfg.max_digits - 1
    return len(str(max(hi * hi if "*" in task.cfg.ops else hi + hi, hi))) + 2


@torch.no_grad()
def sample(model, prompts: list[list[int]], group: int, temperature: float, max_new: int, eos: int, pad: int):
    """G samples per prompt with a KV cache. Returns prompt ids/mask `[B, Tp]`, completions `[B, Tc]`,
    behaviour logprobs `[B, Tc]` and a completion mask `[B, Tc]` (1 up to and including `<eos>`)."""
    from transformers import DynamicCache

    ids, mask = left_pad([p for p in prompts for _ in range(group)], pad)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache, attn = DynamicCache(), mask
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True).logits[
        :, -1
    ]
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    toks, lps, alive = [], [], []
    next_pos = pos[:, -1]
    for _ in range(max_new):
        logp = torch.log_softmax(logits / temperature, -1)
        nxt = torch.multinomial(logp.exp(), 1).squeeze(1)
        toks.append(torch.where(done, pad, nxt))
        lps.append(logp.gather(1, nxt[:, None]).squeeze(1).masked_fill(done, 0.0))
        alive.append(~done)
        done = done | (nxt == eos)
        if done.all():
            break
        next_pos = next_pos + 1
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        logits = model(
            input_ids=toks[-1][:, None],
            attention_mask=attn,
            position_ids=next_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
    return ids, mask, torch.stack(toks, 1), torch.stack(lps, 1), torch.stack(alive, 1).long()


EXACT = make_verifier(ExactConfig())  # the arithmetic task's verifier


def raw(tokenizer) -> Renderer:
    """The raw rendering every Flywheel component uses for the char model (`<bos>` + characters)."""
    return Renderer(RenderConfig(), tokenizer)


def rewards_for(tokenizer, problems, group: int, comp: torch.Tensor, cmask: torch.Tensor) -> torch.Tensor:
    """`[B]` exact-match rewards; a completion without `<eos>` in budget scores 0."""
    texts = tokenizer.batch_decode((comp * cmask).tolist(), skip_special_tokens=True)
    ended = ((comp == tokenizer.eos_token_id) & cmask.bool()).any(1)
    return torch.tensor([EXACT.score(problems[i // group], t) * float(ended[i]) for i, t in enumerate(texts)])


def advantages(r: torch.Tensor, group: int, use_std: bool) -> torch.Tensor:
    """Group-relative advantages `[B]` from rewards `[B]` laid out group-major."""
    g = r.view(-1, group)
    a = g - g.mean(1, keepdim=True)
    if use_std:
        a = a / (g.std(1, keepdim=True) + 1e-4)
    return a.flatten()


def policy_loss(model, batch, args) -> torch.Tensor:
    """Clipped-ratio GRPO loss (+ k3 KL to the behaviour policy), token mean over completion tokens."""
    ids, mask, comp, blp, cmask, adv = batch
    full, attn = torch.cat([ids, comp], 1), torch.cat([mask, cmask], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=full, attention_mask=attn, position_ids=pos).logits[:, ids.shape[1] - 1 : -1]
    llp = torch.log_softmax(logits / args.temperature, -1).gather(2, comp[..., None]).squeeze(-1)
    ratio = torch.exp(llp - blp)
    a = adv[:, None]
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - args.clip, 1 + args.clip) * a)
    log_r = blp - llp
    k3 = torch.exp(log_r) - log_r - 1
    per_tok = (pg + args.kl * k3) * cmask
    return per_tok.sum() / cmask.sum()


def rl_step(model, opt, tokenizer, stream, args, max_new: int) -> dict:
    problems = [next(stream) for _ in range(args.prompts)]
    t0 = time.process_time()
    model.eval()
    ids, mask, comp, blp, cmask = sample(
        model,
        [raw(tokenizer).encode_prompt(p) for p in problems],
        args.group,
        args.temperature,
        max_new,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    r = rewards_for(tokenizer, problems, args.group, comp, cmask)
    t1 = time.process_time()
    adv = advantages(r, args.group, bool(args.adv_std))
    keep = (r.view(-1, args.group).std(1) > 0).repeat_interleave(args.group)
    model.train()
    rows = keep.nonzero().flatten()
    for chunk in rows.chunk(args.updates) if len(rows) else []:
        loss = policy_loss(model, (ids[chunk], mask[chunk], comp[chunk], blp[chunk], cmask[chunk], adv[chunk]), args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    t2 = time.process_time()
    return {"gen_s": t1 - t0, "train_s": t2 - t1, "reward": r.mean().item(), "kept": len(rows)}


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def sft_curve(args, seed: int) -> None:
    task_cfg, spec, sft = configs(args, seed)
    task = make_probe_task(args, task_cfg)
    model, tok = load(build_tiny_model(Path(args.cache) / f"base-{spec.cache_key()}", spec))
    evals, max_new, clock = task.eval_set(), max_answer_tokens(task), [time.process_time(), 0.0]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# sft curve seed={seed} params={n_params / 1e6:.2f}M {task_cfg} {sft}")

    def on_step(step: int, loss: float) -> None:
        if step % args.eval_every == 0:
            clock[1] += time.process_time() - clock[0]
            acc = greedy_accuracy(model, raw(tok), evals, max_new, task.score)
            model.train()
            print(f"sft_step {step:5d}  loss {loss:.4f}  acc {acc:.3f}  train_s {clock[1]:7.1f}", flush=True)
            clock[0] = time.process_time()

    train_sft(model, raw(tok), reference_examples(task, sft.seed), sft, on_step=on_step)


def run_rl(args, seed: int) -> dict:
    task_cfg, spec, sft = configs(args, seed)
    task = make_probe_task(args, task_cfg)
    base = build_tiny_model(Path(args.cache) / f"base-{spec.cache_key()}", spec)
    t0 = time.process_time()
    sft_dir = cold_start(
        base,
        Path(args.cache)
        / f"sft-{spec.cache_key()}-{hash_cfg(task_cfg, sft)}{'-msd' if args.answer_format == 'padded_msd' else ''}",
        task,
        sft,
        threads=args.threads,
    )
    sft_s = time.process_time() - t0
    model, tok = load(sft_dir)
    evals, max_new = task.eval_set(), max_answer_tokens(task)
    acc0 = greedy_accuracy(model, raw(tok), evals, max_new, task.score)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.rl_lr, betas=(0.9, 0.99), weight_decay=0.0)
    stream = task.train_stream(seed=10_000 + seed)
    print(f"# seed={seed} sft_s={sft_s:.1f} (0 if cached) acc0={acc0:.3f}")
    print(f"{'step':>5} {'samples':>7} {'reward':>6} {'acc':>6} {'gain':>6} {'rl_s':>6} {'gen_s':>6} {'train_s':>7}")
    tot = {"gen_s": 0.0, "train_s": 0.0, "samples": 0}
    hit, hit_lo, best = None, None, acc0
    for step in range(1, args.max_rl_steps + 1):
        m = rl_step(model, opt, tok, stream, args, max_new)
        tot["gen_s"] += m["gen_s"]
        tot["train_s"] += m["train_s"]
        tot["samples"] += args.prompts * args.group
        if step % args.eval_every == 0:
            acc = greedy_accuracy(model, raw(tok), evals, max_new, task.score)
            best = max(best, acc)
            rl_s = tot["gen_s"] + tot["train_s"]
            print(
                f"{step:5d} {tot['samples']:7d} {m['reward']:6.3f} {acc:6.3f} {acc - acc0:+6.3f} {rl_s:6.1f} "
                f"{tot['gen_s']:6.1f} {tot['train_s']:7.1f}",
                flush=True,
            )
            if hit_lo is None and acc - acc0 >= args.target_lo:
                hit_lo = {"step": step, "samples": tot["samples"], "rl_s": round(rl_s, 1), "acc": acc}
            if hit is None and acc - acc0 >= args.target:
                hit = {"step": step, "samples": tot["samples"], "rl_s": round(rl_s, 1), "acc": acc}
                break
            if rl_s > args.max_rl_s:
                break
    if args.show_samples:
        show(model, tok, task, args, max_new)
    return {
        "seed": seed,
        "acc0": acc0,
        "best": best,
        "hit": hit,
        "hit_lo": hit_lo,
        "steps": step,
        "sft_s": round(sft_s, 1),
        "gen_s_per_step": round(tot["gen_s"] / step, 3),
        "train_s_per_step": round(tot["train_s"] / step, 3),
    }


def hash_cfg(task_cfg: TaskConfig, sft: SFTConfig) -> str:
    import hashlib

    return hashlib.sha256((task_cfg.model_dump_json() + sft.model_dump_json()).encode()).hexdigest()[:12]


def show(model, tok, task, args, max_new) -> None:
    problems = task.eval_set()[: args.show_samples]
    model.eval()
    ids, mask, comp, _, cmask = sample(
        model, [raw(tok).encode_prompt(p) for p in problems], 1, 1.0, max_new, tok.eos_token_id, tok.pad_token_id
    )
    for p, text in zip(problems, tok.batch_decode((comp * cmask).tolist(), skip_special_tokens=True)):
        print(f"  {p.prompt}{text:<8} (answer {p.answer})")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        if args.sft_curve:
            sft_curve(args, seed)
            continue
        line = json.dumps({**run_rl(args, seed), "args": vars(args)})
        print("SUMMARY " + line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
