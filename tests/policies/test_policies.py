"""Every policy's scores against a naive per-head loop, and the shared selection step."""

import math

import pytest
import torch

from judgeq_vllm.policies import (
    POLICIES,
    H2OPolicy,
    JudgeQPolicy,
    KnormPolicy,
    KVBudget,
    PyramidKVPolicy,
    ScoreInputs,
    SnapKVPolicy,
    StreamingLLMPolicy,
    make_policy,
    select_keep,
)
from judgeq_vllm.soft_tokens import SoftTokens


def fake_soft_tokens(n_soft=8, hidden=16):
    return SoftTokens(torch.randn(n_soft, hidden), base_model="toy", model_fingerprint="0" * 64)


def random_inputs(num_q_heads, num_kv_heads, num_candidates, n_obs, head_dim=16, obs_in_keys=False, seed=0):
    """Queries of the last n_obs positions; with obs_in_keys the observation tokens have
    their own keys after the candidates (Judge Q), else they are the last candidates."""
    gen = torch.Generator().manual_seed(seed)
    key_len = num_candidates + (n_obs if obs_in_keys else 0)
    return ScoreInputs(
        queries=torch.randn(n_obs, num_q_heads, head_dim, generator=gen),
        keys=torch.randn(num_kv_heads, key_len, head_dim, generator=gen),
        num_candidates=num_candidates,
        scale=1 / math.sqrt(head_dim),
    )


def naive_window_attention(inputs):
    """Per kv head, per query head of its group, per observation query: a softmax row."""
    n_obs, num_q_heads, _ = inputs.queries.shape
    num_kv_heads, key_len, _ = inputs.keys.shape
    group = num_q_heads // num_kv_heads
    out = torch.zeros(num_kv_heads, inputs.num_candidates, dtype=torch.float64)
    for h in range(num_kv_heads):
        for g in range(h * group, (h + 1) * group):
            for i in range(n_obs):
                position = key_len - n_obs + i
                visible = inputs.keys[h, : position + 1].double()
                logits = visible @ inputs.queries[i, g].double() * inputs.scale
                probs = torch.softmax(logits, dim=0)
                m = min(position + 1, inputs.num_candidates)
                out[h, :m] += probs[:m]
    return out


def naive_max_pool(row, kernel):
    half = kernel // 2
    return torch.stack([row[max(0, t - half) : t + half + 1].max() for t in range(len(row))])


def naive_pooled(inputs, kernel, window):
    raw = naive_window_attention(inputs)
    prefix = max(inputs.num_candidates - window, 0)
    for h in range(raw.shape[0]):
        if prefix and kernel > 1:
            raw[h, :prefix] = naive_max_pool(raw[h, :prefix], kernel)
    return raw


GQA_SHAPES = [(4, 4), (8, 2), (9, 3), (8, 1)]


@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA_SHAPES)
@pytest.mark.parametrize("num_candidates", [5, 63, 200])
def test_snapkv_scores_match_naive(num_q_heads, num_kv_heads, num_candidates):
    policy = SnapKVPolicy(window=8, pool_kernel=7)
    inputs = random_inputs(num_q_heads, num_kv_heads, num_candidates, n_obs=min(8, num_candidates))
    expected = naive_pooled(inputs, kernel=7, window=8)
    torch.testing.assert_close(policy.score(inputs).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA_SHAPES)
def test_h2o_scores_are_unpooled_window_attention(num_q_heads, num_kv_heads):
    policy = H2OPolicy(window=8)
    inputs = random_inputs(num_q_heads, num_kv_heads, 100, n_obs=8)
    torch.testing.assert_close(policy.score(inputs).double(), naive_window_attention(inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA_SHAPES)
@pytest.mark.parametrize("window", [0, 4])
def test_judgeq_scores_match_naive(num_q_heads, num_kv_heads, window):
    policy = JudgeQPolicy(soft_tokens=fake_soft_tokens(n_soft=6), pool_kernel=7, window=window)
    # the soft tokens' own keys follow the prompt: they enter the softmax, not the scores
    inputs = random_inputs(num_q_heads, num_kv_heads, 120, n_obs=6, obs_in_keys=True)
    scores = policy.score(inputs)
    assert scores.shape == (num_kv_heads, 120)
    torch.testing.assert_close(scores.double(), naive_pooled(inputs, kernel=7, window=window), rtol=1e-5, atol=1e-6)


def test_judgeq_softmax_includes_soft_keys():
    """Removing the soft keys from the softmax would change the scores: they are counted."""
    inputs = random_inputs(4, 2, 50, n_obs=4, obs_in_keys=True)
    without_soft = ScoreInputs(inputs.queries, inputs.keys[:, :50], 50, inputs.scale)
    policy = JudgeQPolicy(soft_tokens=fake_soft_tokens(n_soft=4), pool_kernel=1)
    # without the soft keys every query sees only the prompt, so each row sums to 1
    assert torch.allclose(policy.score(without_soft).sum(-1), torch.full((2,), 2.0 * 4))
    assert (policy.score(inputs).sum(-1) < 2.0 * 4 - 1e-3).all()


@pytest.mark.parametrize("num_kv_heads", [1, 3])
def test_knorm_scores_match_naive(num_kv_heads):
    inputs = random_inputs(num_kv_heads, num_kv_heads, 40, n_obs=0)
    scores = KnormPolicy().score(inputs)
    for h in range(num_kv_heads):
        for t in range(40):
            expected = -math.sqrt(sum(float(x) ** 2 for x in inputs.keys[h, t]))
            assert scores[h, t].item() == pytest.approx(expected, rel=1e-5)


def test_streamingllm_keeps_sinks_and_recent_tokens():
    policy = StreamingLLMPolicy(sinks=4)
    inputs = random_inputs(2, 2, 100, n_obs=0)
    kept = policy.select(inputs, keep=20)
    expected = torch.cat([torch.arange(4), torch.arange(84, 100)])
    assert torch.equal(kept, expected.expand(2, -1))


def test_pyramidkv_budget_schedule_matches_kvcache_factory():
    """Layer budgets as KVCache-Factory computes them, and their mean close to the budget."""
    policy = PyramidKVPolicy(window=32, beta=20)
    keep, num_layers, n = 256, 30, 4000
    counts = [policy.layer_keep_count(keep, n, layer, num_layers) for layer in range(num_layers)]
    min_num = (keep - 32) // 20
    max_num = (keep - 32) * 2 - min_num
    steps = (max_num - min_num) // (num_layers - 1)
    assert counts == [max_num - layer * steps + 32 for layer in range(num_layers)]
    assert counts == sorted(counts, reverse=True)
    assert abs(sum(counts) / num_layers - keep) < steps
    # a short prompt caps the bottom layer at the tokens available
    capped = [policy.layer_keep_count(300, 400, layer, num_layers) for layer in range(num_layers)]
    assert capped[0] == 400 and max(capped) <= 400


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("keep", [1, 16, 64])
def test_selection_counts_unique_in_range(name, keep):
    knobs = {"soft_tokens": fake_soft_tokens(n_soft=8)} if name == "judgeq" else {}
    if name in ("snapkv", "h2o", "pyramidkv"):
        knobs["window"] = 8
    policy = make_policy(name, **knobs)
    n = 150
    n_obs = policy.num_observations
    inputs = random_inputs(8, 2, n, n_obs=n_obs, obs_in_keys=(name == "judgeq"), seed=keep)
    inputs = ScoreInputs(inputs.queries, inputs.keys, n, inputs.scale, layer_idx=3, num_layers=10)
    kept = policy.select(inputs, keep)
    expected_k = policy.layer_keep_count(keep, n, 3, 10)
    assert kept.shape == (2, min(expected_k, n))
    for row in kept:
        assert row.unique().numel() == row.numel()
        assert int(row.min()) >= 0 and int(row.max()) < n
        assert torch.equal(row, row.sort().values)
    protected = policy.protected_mask(n).nonzero().flatten()
    if protected.numel() <= kept.shape[1]:
        for row in kept:
            assert set(protected.tolist()) <= set(row.tolist())


def test_select_keep_prefers_protected_then_top_scores():
    scores = torch.tensor([[5.0, 1.0, 4.0, 0.0, 3.0, 2.0]])
    protected = torch.tensor([False, False, False, False, False, True])
    assert select_keep(scores, 3, protected).tolist() == [[0, 2, 5]]
    # more protected tokens than the budget: the most recent protected ones win
    protected = torch.tensor([False, True, True, True, True, True])
    assert select_keep(scores, 2, protected).tolist() == [[4, 5]]
    # budget >= length keeps everything
    assert select_keep(scores, 10, protected).tolist() == [[0, 1, 2, 3, 4, 5]]


def test_heads_select_independently():
    scores = torch.tensor([[9.0, 0.0, 8.0, 0.0], [0.0, 9.0, 0.0, 8.0]])
    kept = select_keep(scores, 2, torch.zeros(4, dtype=torch.bool))
    assert kept.tolist() == [[0, 2], [1, 3]]


@pytest.mark.parametrize(
    "value,tokens,ratio", [(1024, 1024, None), ("256", 256, None), (0.75, None, 0.75), ("0.5", None, 0.5), (0.0, None, 0.0)]
)
def test_budget_parse(value, tokens, ratio):
    budget = KVBudget.parse(value)
    assert (budget.tokens, budget.ratio) == (tokens, ratio)


def test_budget_keep_counts():
    assert KVBudget(tokens=128).keep_count(1000) == 128
    assert KVBudget(tokens=128).keep_count(100) == 100 and not KVBudget(tokens=128).evicts(100)
    # kvpress convention: the ratio is the fraction removed
    assert KVBudget(ratio=0.75).keep_count(1000) == 250
    assert KVBudget(ratio=0.875).keep_count(1000) == 125
    assert not KVBudget(ratio=0.0).evicts(1000)


@pytest.mark.parametrize("bad", [0, -5, "0", "-1"])
def test_budget_rejects_non_positive_tokens(bad):
    with pytest.raises(ValueError, match="positive token count"):
        KVBudget.parse(bad)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, "1.0"])
def test_budget_rejects_ratio_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        KVBudget.parse(bad)


def test_budget_rejects_garbage():
    with pytest.raises(ValueError, match="neither a token count"):
        KVBudget.parse("lots")


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="unknown eviction policy 'snapkvv'.*choose one of: h2o, judgeq, knorm"):
        make_policy("snapkvv")


def test_unknown_policy_knob():
    with pytest.raises(ValueError, match="policy 'snapkv' has no parameter sinks"):
        make_policy("snapkv", sinks=4)


def test_judgeq_without_artifact_is_a_clear_error():
    with pytest.raises(ValueError, match="judgeq needs a soft-token artifact.*judgeq-vllm train.*snapkv"):
        make_policy("judgeq", soft_tokens=None)


@pytest.mark.parametrize("kernel", [0, 2, 6])
def test_bad_pool_kernel(kernel):
    with pytest.raises(ValueError, match="pool_kernel"):
        SnapKVPolicy(pool_kernel=kernel)


def test_judgeq_default_without_artifact_is_a_clear_error():
    with pytest.raises(ValueError, match="judgeq needs a soft-token artifact"):
        make_policy("judgeq")
