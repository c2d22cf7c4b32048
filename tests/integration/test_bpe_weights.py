"""The real-model path through real actors, with the Qwen-shaped BPE model (no BOS, ChatML template, tied
embeddings, padded vocabulary) on a reasoning-gym task: after a weight broadcast, the behaviour logprobs vLLM
recorded for its sampled tokens match the learner's recomputed logprobs to 1e-4 (fp32)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import ray

from replay.schema import expand_prompts
from services.config import load_config
from services.driver import prepare_model
from services.placement import start_actors

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "model.vocab_size=320",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.tokenizer_corpus_problems=300",
    "cold_start.steps=10",
    "rollout.drop_uniform_groups=false",
    "learner.objective.filter_zero_variance_groups=false",
    "learner.lr=0.01",
    "rollout.prompts_per_step=4",
]


def _gap(learner_logprobs, batch) -> float:
    behaviour = batch.column("behaviour_logprobs").to_pylist()
    return max(abs(a - b) for row, ref in zip(learner_logprobs.tolist(), behaviour) for a, b in zip(row, ref))


def test_vllm_sampled_logprobs_match_the_learner_after_a_broadcast():
    cfg = load_config(REPO / "deploy/configs/bpe_reasoning_cpu.yaml", SMALL)
    cache = REPO / ".cache"
    model_dir, _ = prepare_model(cfg, cache)
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        replay, ranks, workers = start_actors(cfg, model_dir, cache)
        rank, worker = ranks[0], workers[0]
        ray.get(worker.rollout.remote(4))
        first = replay.sample(4, 0, timeout_s=5.0)
        assert first is not None
        before = ray.get(rank.logprobs.remote(first.batch))
        assert _gap(before, first.batch) < 1e-4  # version 0: same weights on both sides
        prompts = expand_prompts(first.batch).column("prompt_ids").to_pylist()  # replay holds them once per group
        assert all(ids[0] != 0 for ids in prompts)  # no BOS/pad in front
        # A near-random cold start usually scores every completion 0, which makes every advantage 0 and the
        # step a no-op; alternate the rewards so the step must move the weights.
        table = pa.Table.from_batches([first.batch])
        rewards = pa.array([float(i % 2) for i in range(table.num_rows)], pa.float32())
        table = table.set_column(table.schema.get_field_index("reward"), "reward", rewards)
        ray.get(rank.train_step.remote(table))
        ray.get([rank.publish.remote(1), worker.receive_weights.remote()])
        assert _gap(ray.get(rank.logprobs.remote(first.batch)), first.batch) > 1e-3, "the step changed nothing"
        ray.get(worker.rollout.remote(4))
        second = replay.sample(4, 1, timeout_s=5.0)
        assert second is not None and set(second.batch.column("policy_version").to_pylist()) == {1}
        assert _gap(ray.get(rank.logprobs.remote(second.batch)), second.batch) < 1e-4
        ray.get([a.shutdown.remote() for a in ranks + workers])
    finally:
        ray.shutdown()
