"""Start-up checks that need the tokenizer: the base model, rendering, stop tokens and the verifier.

Contract:
- `build_base_model(cfg, cache_dir)` returns the policy's base directory: `model.path`, or the built-in
  model (char Llama on the task's alphabet, or the Qwen2-shaped BPE model with a tokenizer trained on
  the task's text), built offline and cached by spec and training text.
- `preflight(cfg, model_dir)` loads the tokenizer, renders and encodes one train and one eval prompt,
  resolves the stop conditions and scores each problem's reference completion with the scoring function
  the run will use (`reward.function`, run as rollout runs it, else `task.verifier`). It raises
  `ConfigError` naming the field when a chat template is asked for and missing, a stop token does not
  exist, the template's end of turn is not a stop token, or a reference completion scores below 1 under
  the task's verifier (a user's function is untrusted code with its own contract: its verdict is shown),
  or `learner.critic.path` is not a one-label checkpoint with the policy's tokenizer. The driver runs it
  before the cold start and `--dry-run` prints its report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from services.config import ConfigError, RunConfig


def task_corpus(cfg: RunConfig) -> list[str]:
    """The texts a built-in tokenizer is built from: training prompts and reference completions (a dataset's
    rows), worked solutions when the cold start uses them, and the system prompt."""
    from rollout.datasets import DatasetTaskConfig, dataset_texts
    from rollout.tasks import make_task

    if isinstance(cfg.task, DatasetTaskConfig):
        texts = dataset_texts(cfg.task)
    else:
        texts = make_task(cfg.task).corpus(cfg.model.tokenizer_corpus_problems)
    if cfg.cold_start is not None and cfg.cold_start.solutions_path is not None:
        from learner.sft import load_solutions

        texts += [t for p, c in load_solutions(cfg.cold_start.solutions_path, set()) for t in (p.prompt, c)]
    if cfg.cold_start is not None and cfg.cold_start.worked_solutions is not None:
        from learner.sft import reference_examples

        examples = reference_examples(make_task(cfg.task), 0, cfg.cold_start.worked_solutions)
        try:
            texts += [c for _, (_, c) in zip(range(cfg.model.tokenizer_corpus_problems), examples)]
        except ValueError as e:
            raise ConfigError(f"cold_start.worked_solutions: {e}") from None
    return texts + ([cfg.render.system_prompt] if cfg.render.system_prompt else [])


def _char_alphabet(cfg: RunConfig) -> str:
    """The char model's characters: the arithmetic task's fixed alphabet (so its token ids never depend on
    which problems were drawn), else every character of the task's text."""
    from rollout.tasks import ARITHMETIC_ALPHABET

    if cfg.task.kind == "arithmetic":
        return ARITHMETIC_ALPHABET
    return "".join(sorted(set("".join(task_corpus(cfg)))))


def build_base_model(cfg: RunConfig, cache_dir: Path) -> Path:
    """`model.path`, or the built-in model `model.builtin` for this task (cached under cache_dir/models)."""
    if cfg.model.path is not None:
        return Path(cfg.model.path).expanduser()
    sizes = cfg.model.model_dump(
        include={"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "seed"}
    )
    sizes["max_position_embeddings"] = cfg.model.max_position_embeddings
    if cfg.model.builtin == "char_llama":
        from learner.tiny_model import TinyModelSpec, build_tiny_model

        spec = TinyModelSpec(alphabet=_char_alphabet(cfg), **sizes)
        return build_tiny_model(cache_dir / "models" / f"tiny-{spec.cache_key()}", spec)
    from learner.bpe_model import BPEModelSpec, build_bpe_model, corpus_digest

    spec = BPEModelSpec(
        vocab_size=cfg.model.vocab_size,
        num_key_value_heads=cfg.model.num_key_value_heads,
        tie_word_embeddings=cfg.model.tie_word_embeddings,
        **sizes,
    )
    corpus = task_corpus(cfg)
    key = hashlib.sha256(f"{spec.model_dump_json()}|{corpus_digest(corpus)}".encode()).hexdigest()[:16]
    return build_bpe_model(cache_dir / "models" / f"bpe-{key}", spec, corpus)


@dataclasses.dataclass(frozen=True)
class PromptCheck:
    split: str
    text: str
    num_tokens: int
    reference: str
    score: float


@dataclasses.dataclass(frozen=True)
class PreflightReport:
    tokenizer: str
    stop: str
    verifier: str
    prompts: tuple[PromptCheck, ...]

    def format(self) -> str:
        lines = [f"tokenizer: {self.tokenizer}", self.stop, f"scoring: {self.verifier}"]
        for p in self.prompts:
            lines += [
                f"{p.split} prompt ({p.num_tokens} tokens): {p.text!r}",
                f"  reference completion {p.reference!r} -> score {p.score:g}",
            ]
        return "\n".join(lines)


def _describe_tokenizer(renderer) -> str:
    tok = renderer.tokenizer
    chat = "yes" if getattr(tok, "chat_template", None) else "no"
    return (
        f"{type(tok).__name__}, {len(tok)} tokens, bos={tok.bos_token!r}, eos={tok.eos_token!r}, "
        f"pad={tok.pad_token!r}, chat template: {chat}; render.mode={renderer.cfg.mode}"
    )


def _user_scores(cfg: RunConfig, items: list) -> list[float]:
    """The user's reward function on (problem, completion) items, called as rollout calls it (isolation,
    timeout); a failed call scores NaN."""
    from rollout.rewards import RewardScorer, load_reward_function

    try:
        fn = load_reward_function(cfg.reward.function)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    with RewardScorer(fn, cfg.reward) as scorer:
        rewards = scorer.score_batch(items).rewards
    return [float("nan") if r is None else r for r in rewards]


def _check_problem(split: str, problem, renderer, task, cfg: RunConfig) -> PromptCheck:
    """Render `problem` and score its reference completion. Only the built-in verifier is held to it: a
    user's reward function is untrusted code with its own contract, so its verdict is reported only."""
    from rollout.render import RenderError

    ids = renderer.encode_prompt(problem)
    reference = task.reference_completion(problem)
    try:
        renderer.target_ids(problem, reference)
    except RenderError as e:
        raise ConfigError(str(e)) from None
    if cfg.reward.function:
        (value,) = _user_scores(cfg, [(problem, reference)])
        return PromptCheck(split, renderer.prompt_text(problem), len(ids), reference, value)
    field = "task.verifier"
    if cfg.cold_start is not None and cfg.cold_start.worked_solutions is not None:
        from rollout.worked_solutions import WORKED_SOLUTIONS

        try:
            reference = WORKED_SOLUTIONS[cfg.cold_start.worked_solutions](problem, reference)
        except ValueError as e:
            raise ConfigError(f"cold_start.worked_solutions: {e}") from None
        field = "cold_start.worked_solutions / task.verifier"
    value = float(task.score(problem, reference))
    if value < 1.0:
        raise ConfigError(
            f"{field}: the {split} problem's own reference answer scores {value:g}, not 1 (prompt "
            f"{problem.prompt[:120]!r}, answer {problem.answer!r}, completion {reference!r}); the verifier "
            "cannot read this dataset's answers: pick another task.verifier (kind / extract) or fix the answers"
        )
    return PromptCheck(split, renderer.prompt_text(problem), len(ids), reference, value)


def preflight(cfg: RunConfig, model_dir: Path) -> PreflightReport:
    """See the module docstring. Dataset errors (rollout.datasets.DatasetError) pass through."""
    from learner.critic import check_critic
    from rollout.render import Renderer, RenderError
    from rollout.tasks import make_task

    try:
        renderer = Renderer.from_pretrained(cfg.render, model_dir)
    except RenderError as e:
        raise ConfigError(f"{e} (tokenizer of {model_dir})") from None
    if cfg.learner.critic is not None:
        try:
            check_critic(model_dir, cfg.learner.critic.path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    try:
        task = make_task(cfg.task, renderer)
        train, held_out = next(task.train_stream()), task.eval_set()[0]
    except RenderError as e:
        raise ConfigError(str(e)) from None
    checks = tuple(_check_problem(split, p, renderer, task, cfg) for split, p in (("train", train), ("eval", held_out)))
    scoring = (
        f"reward.function {cfg.reward.function} (replaces task.verifier for rewards and eval)"
        if cfg.reward.function
        else f"task.verifier {json.dumps(cfg.task.verifier.model_dump())}"
    )
    return PreflightReport(_describe_tokenizer(renderer), renderer.describe_stop(), scoring, checks)
