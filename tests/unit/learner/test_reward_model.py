import torch

from learner.pair_training import pack_sequences, pair_tokens
from learner.reward_model import (
    RewardModelTrainConfig,
    evaluate_reward_model,
    init_reward_model,
    save_reward_model,
    sequence_scores,
    train_reward_model,
)
from rollout.preferences import PreferencePair
from rollout.problem import Problem


def _pairs(n: int, offset: int = 0) -> list[PreferencePair]:
    # chosen ends in "1", rejected in "2" (char ids 4 and 5 after the 3 specials): an easy, learnable preference
    out = []
    for i in range(offset, offset + n):
        prompt = (1, 3 + i % 10, 3 + (i // 10) % 10, 16)
        out.append(PreferencePair(Problem(str(i), "", "t"), prompt, (3 + i % 7, 4, 2), (3 + i % 7, 5, 2)))
    return out


def test_pack_sequences_layout():
    tb = pack_sequences([[7, 8], [9]], [[1], [2, 3, 4]], pad_id=0)
    assert tb.input_ids.tolist() == [[7, 8, 1, 0, 0], [0, 9, 2, 3, 4]]
    assert tb.attention_mask.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert tb.position_ids.tolist()[1][1:] == [0, 1, 2, 3]
    assert tb.mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert tb.prompt_len == 2


def test_pair_tokens_stacks_chosen_then_rejected():
    pairs = _pairs(3)
    tb = pair_tokens(pairs, pad_id=0)
    assert tb.input_ids.shape[0] == 6
    assert tb.completion_ids[0].tolist() == list(pairs[0].chosen_ids)
    assert tb.completion_ids[3].tolist() == list(pairs[0].rejected_ids)


def test_sequence_scores_match_hf_forward_and_ignore_padding(tiny_model_dir):
    model = init_reward_model(tiny_model_dir).eval()
    one = pack_sequences([[1, 5, 6]], [[7, 2]], pad_id=0)
    padded = pack_sequences([[1, 5, 6], [1, 4, 4, 4, 4]], [[7, 2], [7, 7, 7, 2]], pad_id=0)
    with torch.no_grad():
        hf = model(input_ids=one.input_ids).logits.squeeze(-1)
        alone, batched = sequence_scores(model, one), sequence_scores(model, padded)
    torch.testing.assert_close(alone, hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[:1], alone, atol=1e-4, rtol=1e-4)


def test_reward_model_learns_a_preference_and_round_trips_through_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = init_reward_model(tiny_model_dir)
    train, held = _pairs(64), _pairs(32, offset=500)
    before = evaluate_reward_model(model, held)
    cfg = RewardModelTrainConfig(steps=30, pairs_per_step=16, lr=1e-3, warmup_steps=2, eval_every_steps=30)
    seen = []
    after = train_reward_model(model, train, held, cfg, on_metrics=lambda step, rec: seen.append((step, rec)))
    assert [s for s, _ in seen] == list(range(1, 31))
    assert "rm/eval_pairwise_accuracy" in seen[-1][1]
    assert after["rm/eval_pairwise_accuracy"] >= 0.95 > before["rm/eval_pairwise_accuracy"] - 0.5
    assert after["rm/eval_reward_gap"] > 0.5
    out = save_reward_model(model, tiny_model_dir, tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert loaded.config.num_labels == 1
    tb = pair_tokens(held[:4], 0)
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(loaded, tb), sequence_scores(model.eval(), tb))


def test_reward_model_training_stops_at_its_wall_clock_budget_with_a_final_evaluation(tiny_model_dir):
    model = init_reward_model(tiny_model_dir)
    cfg = RewardModelTrainConfig(steps=50, pairs_per_step=4, lr=1e-3, eval_every_steps=50, max_wall_s=1e-9)
    seen = []
    final = train_reward_model(model, _pairs(8), _pairs(4, 500), cfg, on_metrics=lambda s, r: seen.append((s, r)))
    assert [s for s, _ in seen] == [1]  # the first step already exceeds the budget
    assert final == {k: v for k, v in seen[0][1].items() if k.startswith("rm/eval_")}
