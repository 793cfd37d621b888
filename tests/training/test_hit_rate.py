"""The hit-rate evaluation: overlap arithmetic, its skip rule, and a real small case."""

import torch

from judgeq_vllm.policies import JudgeQPolicy, ScoreInputs, SnapKVPolicy, observation_attention, select_keep
from judgeq_vllm.soft_tokens import SoftTokens
from judgeq_vllm.training.hit_rate import (
    PromptObservation,
    evaluate_hit_rates,
    hit_rate_policies,
    layer_overlap,
    prompt_hit_rates,
)


def test_layer_overlap_counts_the_shared_share_of_the_reference_top_k():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    assert layer_overlap(scores.topk(2).indices, scores).tolist() == [1.0, 1.0]
    assert layer_overlap(select_keep(scores, 3, torch.zeros(5, dtype=torch.bool)), scores).tolist() == [1.0, 1.0]
    kept = torch.tensor([[0, 4], [0, 1]])  # head 0 keeps one of its top 2, head 1 none
    assert layer_overlap(kept, scores).tolist() == [0.5, 0.0]


def _synthetic_observation(prompt_len=40, n_obs=6, layers=3):
    generator = torch.Generator().manual_seed(0)
    inputs = [
        ScoreInputs(torch.randn(n_obs, 4, 8, generator=generator), torch.randn(2, prompt_len + n_obs, 8, generator=generator),
                    prompt_len, 0.35, layer, layers)
        for layer in range(layers)
    ]
    # the reference is scored exactly as the policy scores: the same queries, no pooling
    observation = PromptObservation(prompt_len, [observation_attention(i) for i in inputs], {"same": inputs})
    soft = SoftTokens(torch.zeros(n_obs, 8), "synthetic", "0" * 64)
    return observation, {"same": JudgeQPolicy(soft_tokens=soft, pool_kernel=1)}


def test_identical_scoring_gives_a_hit_rate_of_one():
    observation, policies = _synthetic_observation()
    assert prompt_hit_rates(observation, policies, 10) == {"same": 1.0}


def test_a_prompt_that_fits_the_budget_is_skipped():
    observation, policies = _synthetic_observation(prompt_len=40)
    assert prompt_hit_rates(observation, policies, 40) is None
    assert prompt_hit_rates(observation, policies, 39) == {"same": 1.0}


def test_hit_rates_on_smollm2(reference_model, heldout_samples, soft_tokens):
    policies = hit_rate_policies(soft_tokens, None)
    assert isinstance(policies["snapkv"], SnapKVPolicy) and policies["snapkv"].window == 32
    longest = max(len(s.prompt_ids) for s in heldout_samples)
    results = evaluate_hit_rates(reference_model, heldout_samples, policies, [16, 64, longest], show_progress=False)
    assert results[str(longest)] == {"n_prompts": 0, "judgeq": None, "snapkv": None}
    for budget in ("16", "64"):
        assert results[budget]["n_prompts"] == len(heldout_samples)
        assert 0.0 < results[budget]["judgeq"] <= 1.0 and 0.0 < results[budget]["snapkv"] <= 1.0
