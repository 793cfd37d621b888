"""The decode-time reference with StreamingLLM's selection (``streamingllm-decode``), on the
real SmolLM2-135M-Instruct weights (fp32, CPU)."""

import pytest
import torch

from judgeq_vllm.policies import KVBudget, StreamingLLMDecodePolicy, StreamingLLMPolicy
from judgeq_vllm.reference import generate, generate_gkv

BUDGET, INTERVAL, SINKS = 128, 32, 4
NEW_TOKENS = 100


def sinks_and_recent(num_tokens, budget=BUDGET):
    """The original positions StreamingLLM keeps once ``num_tokens`` tokens are in: the
    prompt's first tokens and the latest ones."""
    return torch.cat([torch.arange(SINKS), torch.arange(num_tokens - budget + SINKS, num_tokens)])


@pytest.fixture(scope="module")
def streaming_run(reference_model, long_prompts):
    """Compressed at the prefill (the ~400-token prompt exceeds the budget), then every INTERVAL passes."""
    policy = StreamingLLMDecodePolicy(sinks=SINKS, interval=INTERVAL)
    return generate_gkv(reference_model, long_prompts[0], policy, BUDGET, NEW_TOKENS, stop_token_ids=[])


def test_every_compression_keeps_the_prompt_sinks_and_the_latest_tokens(streaming_run, reference_model, long_prompts):
    config = reference_model.config
    prompt_len = len(long_prompts[0])
    assert len(streaming_run.token_ids) == NEW_TOKENS
    assert [e.forward_index for e in streaming_run.evictions] == [0, 32, 64, 96]
    assert [e.resident for e in streaming_run.evictions] == [prompt_len] + [BUDGET + INTERVAL] * 3
    assert max(streaming_run.resident_after_pass[1:]) == BUDGET + INTERVAL
    for eviction in streaming_run.evictions:
        assert eviction.num_tokens == prompt_len + eviction.forward_index
        # the sink rows are the prompt's first tokens at every compression, not the
        # first rows some earlier compression happened to leave
        expected = sinks_and_recent(eviction.num_tokens).expand(config.num_key_value_heads, -1)
        for layer, positions in enumerate(eviction.kept_positions):
            assert torch.equal(positions, expected), (eviction.forward_index, layer)


def test_the_prefill_compression_is_the_prefill_policys(streaming_run, reference_model, long_prompts):
    """Pass 0 keeps what the prefill-only StreamingLLM keeps, so the tokens agree until the
    next compression changes the cache (pass INTERVAL still attends over the whole cache)."""
    prefill_only = generate(
        reference_model, long_prompts[0], StreamingLLMPolicy(sinks=SINKS), KVBudget(tokens=BUDGET), INTERVAL + 1,
        stop_token_ids=[],
    )
    for layer, kept in enumerate(streaming_run.evictions[0].kept):
        assert torch.equal(kept, prefill_only.kept_indices[layer]), layer
    assert streaming_run.token_ids[: INTERVAL + 1] == prefill_only.token_ids


def test_a_prompt_within_the_budget_is_first_compressed_during_decoding(reference_model, long_prompts):
    ids = long_prompts[0]
    budget = len(ids) + 20
    policy = StreamingLLMDecodePolicy(sinks=SINKS, interval=INTERVAL)
    result = generate_gkv(reference_model, ids, policy, budget, INTERVAL + 2, stop_token_ids=[])
    assert [e.forward_index for e in result.evictions] == [INTERVAL]
    (eviction,) = result.evictions
    assert eviction.resident == eviction.num_tokens == len(ids) + INTERVAL
    for positions in eviction.kept_positions:
        assert torch.equal(positions[0], sinks_and_recent(eviction.num_tokens, budget))


def test_bad_budget(reference_model, long_prompts):
    with pytest.raises(ValueError, match="must exceed the sinks"):
        generate_gkv(reference_model, long_prompts[0], StreamingLLMDecodePolicy(sinks=SINKS), SINKS, 4)
