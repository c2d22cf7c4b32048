import copy

import torch

from learner.dpo import DPOConfig, evaluate_dpo, sequence_logprobs, train_dpo
from learner.pair_training import pack_sequences
from rollout.preferences import PreferencePair
from rollout.problem import Problem


def _pairs(n: int, offset: int = 0) -> list[PreferencePair]:
    out = []
    for i in range(offset, offset + n):
        prompt = (1, 3 + i % 10, 3 + (i // 10) % 10, 16)
        out.append(PreferencePair(Problem(str(i), "", "t"), prompt, (3 + i % 7, 4, 2), (3 + i % 7, 5, 2)))
    return out


def test_sequence_logprobs_match_a_teacher_forced_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tb = pack_sequences([[1, 5, 6], [1, 7]], [[8, 2], [9, 9, 2]], pad_id=0)
    with torch.no_grad():
        got = sequence_logprobs(model, tb)
        logits = model(torch.tensor([[1, 5, 6, 8, 2]])).logits.log_softmax(-1)[0]
        expected = logits[2, 8] + logits[3, 2]
        got_mean = sequence_logprobs(model, tb, average=True)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_mean, got / torch.tensor([2.0, 3.0]))


def test_dpo_starts_at_log2_and_learns_the_preference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = copy.deepcopy(policy)
    held = _pairs(16, offset=300)
    for kind in ("dpo", "ipo", "cdpo"):
        start = evaluate_dpo(policy, reference, held, 0, DPOConfig(kind=kind, label_smoothing=0.1))
        if kind != "ipo":
            assert abs(start["dpo/eval_loss"] - 0.6931) < 1e-3  # policy == reference: -log sigmoid(0)
        assert start["dpo/eval_preference_accuracy"] == 0.5  # equal implicit rewards: ties
    cfg = DPOConfig(steps=15, pairs_per_step=8, lr=1e-3, beta=0.5, warmup_steps=1, eval_every_steps=15)
    after = train_dpo(policy, reference, _pairs(48), held, cfg, pad_id=0)
    assert after["dpo/eval_preference_accuracy"] >= 0.9 and after["dpo/eval_reward_margin"] > 0
    assert after["dpo/eval_loss"] < 0.6931
    assert not any(p.requires_grad for p in reference.parameters())
