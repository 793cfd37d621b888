"""The HF reference on the real SmolLM2-135M-Instruct weights (fp32, CPU)."""

import pytest
import torch

from judgeq_vllm.policies import POLICIES, KVBudget, make_policy
from judgeq_vllm.reference import generate
from judgeq_vllm.soft_tokens import SoftTokenArtifactError, SoftTokens, init_soft_tokens

NEW_TOKENS = 12


def policy_for(name, soft_tokens):
    return make_policy(name, soft_tokens=soft_tokens) if name == "judgeq" else make_policy(name)


@pytest.fixture(scope="module")
def plain_outputs(plain_model, long_prompts):
    """Plain HF greedy generation (sdpa, no eviction machinery at all)."""
    outputs = []
    for ids in long_prompts:
        out = plain_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        outputs.append(out[0, len(ids) :].tolist())
    return outputs


def test_prompt_within_budget_is_not_evicted(reference_model, long_prompts, plain_outputs):
    """The policy is never consulted when the prompt fits: the plain path for every policy."""
    ids = long_prompts[0]
    result = generate(reference_model, ids, make_policy("snapkv"), KVBudget(tokens=len(ids)), NEW_TOKENS)
    assert result.kept_indices is None
    assert result.token_ids == plain_outputs[0]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_budget_above_prompt_equals_plain_generation(name, reference_model, soft_tokens, long_prompts, plain_outputs):
    """The whole machinery run with a budget >= the prompt (observation queries recorded,
    soft tokens appended then dropped, cache rebuilt from the kept rows) changes nothing."""
    policy = policy_for(name, soft_tokens)
    # Judge Q is the policy with most to get wrong here (positions, soft KV): both prompts
    prompts = long_prompts if name == "judgeq" else long_prompts[:1]
    for ids, expected in zip(prompts, plain_outputs):
        result = generate(reference_model, ids, policy, KVBudget(tokens=len(ids) + 10), NEW_TOKENS, force_eviction_pass=True)
        assert result.token_ids == expected
        assert result.cache_lengths == [len(ids)] * len(result.cache_lengths)


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("keep", [64, 200])
def test_tight_budget_keeps_exactly_budget(name, keep, reference_model, soft_tokens, long_prompts):
    policy = policy_for(name, soft_tokens)
    ids = long_prompts[0]
    result = generate(reference_model, ids, policy, KVBudget(tokens=keep), 4)
    config = reference_model.config
    assert len(result.kept_indices) == config.num_hidden_layers
    protected = set(policy.protected_mask(len(ids)).nonzero().flatten().tolist())
    for layer, kept in enumerate(result.kept_indices):
        k = policy.layer_keep_count(keep, len(ids), layer, config.num_hidden_layers)
        assert kept.shape == (config.num_key_value_heads, k)
        assert result.cache_lengths[layer] == k
        for row in kept:
            assert row.unique().numel() == k
            assert 0 <= int(row.min()) and int(row.max()) < len(ids)
            assert protected <= set(row.tolist())
    if name == "streamingllm":
        expected = list(range(4)) + list(range(len(ids) - keep + 4, len(ids)))
        assert all(row.tolist() == expected for kept in result.kept_indices for row in kept)
    if name in ("snapkv", "h2o", "pyramidkv"):
        window = set(range(len(ids) - 32, len(ids)))
        assert all(window <= set(row.tolist()) for kept in result.kept_indices for row in kept)


def test_heads_keep_different_tokens(reference_model, long_prompts):
    """Per-head selection is real: some layer's heads disagree on what to keep."""
    result = generate(reference_model, long_prompts[0], make_policy("snapkv"), KVBudget(tokens=64), 2)
    assert any(not torch.equal(kept[0], kept[1]) for kept in result.kept_indices)


def test_judgeq_decodes_from_prompt_end_and_drops_soft_kv(reference_model, soft_tokens, long_prompts):
    ids = long_prompts[1]
    policy = make_policy("judgeq", soft_tokens=soft_tokens)
    result = generate(reference_model, ids, policy, KVBudget(tokens=96), NEW_TOKENS)
    # the first new token is fed back at position prompt_len, then one by one
    assert result.positions == list(range(len(ids), len(ids) + len(result.token_ids)))
    # nothing sampled is a soft token: every id is a real vocabulary entry
    assert all(0 <= t < reference_model.config.vocab_size for t in result.token_ids)
    # only the kept prompt rows are in the cache: no soft-token KV
    assert result.cache_lengths == [96] * reference_model.config.num_hidden_layers
    assert all(int(kept.max()) < len(ids) for kept in result.kept_indices)


def test_judgeq_scores_depend_on_the_soft_tokens(reference_model, long_prompts):
    ids = long_prompts[0]
    a = init_soft_tokens(reference_model, "SmolLM2-135M-Instruct", n_soft=32, seed=1)
    b = init_soft_tokens(reference_model, "SmolLM2-135M-Instruct", n_soft=32, seed=2)
    kept_a = generate(reference_model, ids, make_policy("judgeq", soft_tokens=a), KVBudget(tokens=64), 1).kept_indices
    kept_b = generate(reference_model, ids, make_policy("judgeq", soft_tokens=b), KVBudget(tokens=64), 1).kept_indices
    assert any(not torch.equal(x, y) for x, y in zip(kept_a, kept_b))


def test_ratio_budget_keeps_kvpress_count(reference_model, long_prompts):
    ids = long_prompts[0]
    result = generate(reference_model, ids, make_policy("snapkv"), KVBudget(ratio=0.75), 2)
    assert result.cache_lengths[0] == int(len(ids) * 0.25)


def test_wrong_model_artifact_is_rejected(reference_model, soft_tokens, long_prompts):
    foreign = SoftTokens(soft_tokens.embeddings, base_model="Llama-3.1-8B-Instruct", model_fingerprint="f" * 64)
    with pytest.raises(SoftTokenArtifactError, match="trained for model 'Llama-3.1-8B-Instruct'.*used with model"):
        generate(reference_model, long_prompts[0], make_policy("judgeq", soft_tokens=foreign), KVBudget(tokens=64), 1)


def test_bad_generation_arguments(reference_model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(reference_model, [1, 2, 3], make_policy("snapkv"), KVBudget(tokens=8), 0)
    with pytest.raises(ValueError, match="empty"):
        generate(reference_model, [], make_policy("snapkv"), KVBudget(tokens=8), 4)
