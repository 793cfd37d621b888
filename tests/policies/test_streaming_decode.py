"""StreamingLLM's decode-time variant: the prefill policy's selection, on G-KV's schedule."""

import pytest
import torch

from judgeq_vllm.policies import GKVPolicy, ScoreInputs, StreamingLLMDecodePolicy, StreamingLLMPolicy


def random_keys(num_kv_heads, num_rows, head_dim=8, seed=0):
    return torch.randn(num_kv_heads, num_rows, head_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sinks", [0, 1, 4])
@pytest.mark.parametrize("num_rows,budget", [(21, 20), (100, 20), (176, 112)])
def test_compress_keeps_what_the_prefill_policy_keeps(sinks, num_rows, budget):
    """One compression keeps what the prefill StreamingLLM keeps of as many candidates: the
    sinks, then the most recent rows, every kv head the same."""
    keys = random_keys(3, num_rows)
    compression = StreamingLLMDecodePolicy(sinks=sinks).compress(None, keys, 0.25, budget, None)
    inputs = ScoreInputs(queries=torch.empty(0, 6, 8), keys=keys, num_candidates=num_rows, scale=0.25)
    assert torch.equal(compression.kept, StreamingLLMPolicy(sinks=sinks).select(inputs, budget))
    expected = torch.cat([torch.arange(sinks), torch.arange(num_rows - budget + sinks, num_rows)])
    assert torch.equal(compression.kept, expected.expand(3, -1))
    assert compression.global_scores is None


def test_batched_rows_match_one_compression_per_cache():
    policy = StreamingLLMDecodePolicy(sinks=4)
    num_rows = torch.tensor([21, 40, 140])
    batched = policy.kept_rows(num_rows, 20)
    assert batched.shape == (3, 20) and batched.dtype == torch.int64
    for rows, kept in zip(num_rows.tolist(), batched):
        assert torch.equal(kept, policy.compress(None, random_keys(1, rows), 1.0, 20, None).kept[0])


def test_schedule_is_gkvs():
    """Same interval, same compressions: pass index a multiple of the interval, cache over budget."""
    streaming, gkv = StreamingLLMDecodePolicy(interval=32), GKVPolicy(interval=32)
    for forward_index in range(0, 200, 8):
        for resident in (100, 112, 113, 144):
            expected = gkv.compresses_at(forward_index, resident, 112)
            assert streaming.compresses_at(forward_index, resident, 112) == expected
    assert streaming.compresses_at(64, 113, 112) and not streaming.compresses_at(65, 144, 112)
    assert not streaming.compresses_at(64, 112, 112)


def test_needs_no_queries_and_carries_no_scores():
    policy = StreamingLLMDecodePolicy()
    assert (policy.window, policy.carries_scores, policy.sinks, policy.interval) == (0, False, 4, 128)
    assert (GKVPolicy().window, GKVPolicy().carries_scores) == (16, True)


@pytest.mark.parametrize("knobs,message", [({"sinks": -1}, "sinks=-1 must be >= 0"), ({"interval": 0}, "interval=0")])
def test_bad_knobs(knobs, message):
    with pytest.raises(ValueError, match=message):
        StreamingLLMDecodePolicy(**knobs)


def test_budget_must_exceed_the_sinks_and_the_cache_the_budget():
    policy = StreamingLLMDecodePolicy(sinks=4)
    with pytest.raises(ValueError, match=r"the budget \(4 tokens\) must exceed the sinks \(4\)"):
        policy.check_budget(4)
    policy.check_budget(5)
    with pytest.raises(ValueError, match="needs more than 20 rows, got 20"):
        policy.compress(None, random_keys(2, 20), 1.0, 20, None)
