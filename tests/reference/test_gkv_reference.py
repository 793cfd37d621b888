"""The G-KV decode-time reference on the real SmolLM2-135M-Instruct weights (fp32, CPU)."""

import pytest
import torch

from judgeq_vllm.policies import GKVPolicy, KVBudget, make_policy
from judgeq_vllm.reference import generate, generate_gkv, record_attention

BUDGET, INTERVAL, WINDOW = 128, 32, 16
NEW_TOKENS = 100


class FullRecorder:
    """Every layer's last ``window`` queries and all keys of one forward pass."""

    def __init__(self, window):
        self.window, self.queries, self.keys = window, {}, {}

    def record(self, layer_idx, query, key):
        self.queries[layer_idx] = query[0, :, -self.window :, :].permute(1, 0, 2).cpu()
        self.keys[layer_idx] = key[0].cpu()


def full_prefill_record(model, ids, window):
    """The queries and keys of one plain causal pass over ``ids`` (nothing compressed)."""
    recorder = FullRecorder(window)
    with torch.inference_mode(), record_attention(recorder):
        model(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None])
    return recorder


@pytest.fixture(scope="module")
def gkv_run(reference_model, long_prompts):
    """G-KV from the prefill on (the ~400-token prompt exceeds the budget), never stopped early."""
    policy = GKVPolicy(window=WINDOW, interval=INTERVAL)
    return generate_gkv(reference_model, long_prompts[0], policy, BUDGET, NEW_TOKENS, stop_token_ids=[])


def test_budget_above_generation_equals_plain_generation(reference_model, plain_model, long_prompts):
    """The decode loop with its query window and position bookkeeping, never compressing,
    is plain greedy generation."""
    ids = long_prompts[0]
    expected = plain_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    result = generate_gkv(reference_model, ids, GKVPolicy(interval=16), len(ids) + 100, 24)
    assert result.evictions == []
    assert result.token_ids == expected


def test_compressions_follow_the_schedule_and_keep_the_budget(gkv_run, reference_model, long_prompts):
    config = reference_model.config
    prompt_len = len(long_prompts[0])
    assert len(gkv_run.token_ids) == NEW_TOKENS
    # pass 0 is the prefill; then every INTERVAL passes, the cache then holding BUDGET + INTERVAL rows
    assert [e.forward_index for e in gkv_run.evictions] == [0, 32, 64, 96]
    assert [e.resident for e in gkv_run.evictions] == [prompt_len] + [BUDGET + INTERVAL] * 3
    assert max(gkv_run.resident_after_pass[1:]) == BUDGET + INTERVAL
    # before each compression the cache holds the previous kept rows and the tokens fed since
    previous_positions = [torch.arange(prompt_len).expand(config.num_key_value_heads, -1)] * config.num_hidden_layers
    previous_num_tokens = prompt_len
    for eviction in gkv_run.evictions:
        assert eviction.num_tokens == prompt_len + eviction.forward_index
        assert len(eviction.kept) == config.num_hidden_layers
        fed_since = set(range(previous_num_tokens, eviction.num_tokens))
        for layer, (kept, positions) in enumerate(zip(eviction.kept, eviction.kept_positions)):
            assert kept.shape == positions.shape == (config.num_key_value_heads, BUDGET)
            # the last WINDOW rows (the queries' own tokens) are always kept
            last = torch.arange(eviction.num_tokens - WINDOW, eviction.num_tokens)
            assert torch.equal(positions[:, -WINDOW:], last.expand(config.num_key_value_heads, -1))
            for head in range(config.num_key_value_heads):
                row = positions[head]
                assert torch.equal(row, row.sort().values) and row.unique().numel() == BUDGET
                assert set(row.tolist()) <= set(previous_positions[layer][head].tolist()) | fed_since
                # kept indices address the resident rows in order
                resident = torch.cat([previous_positions[layer][head], torch.tensor(sorted(fed_since), dtype=torch.long)])
                assert torch.equal(resident[kept[head]], row)
        previous_positions, previous_num_tokens = eviction.kept_positions, eviction.num_tokens
    # heads keep different tokens
    assert not torch.equal(gkv_run.evictions[-1].kept_positions[5][0], gkv_run.evictions[-1].kept_positions[5][1])


def test_prefill_compression_scores_the_last_prompt_queries(gkv_run, reference_model, long_prompts):
    """Compression 0 equals the policy applied to a separately recorded plain prefill."""
    ids = long_prompts[0]
    recorded = full_prefill_record(reference_model, ids, WINDOW)
    policy = GKVPolicy(window=WINDOW, interval=INTERVAL)
    scale = reference_model.model.layers[0].self_attn.scaling
    for layer, kept in enumerate(gkv_run.evictions[0].kept):
        expected = policy.compress(recorded.queries[layer], recorded.keys[layer], scale, BUDGET, None).kept
        assert torch.equal(kept, expected), f"layer {layer}"


def test_first_decode_compression_scores_the_decode_queries(reference_model, long_prompts):
    """A prompt within the budget is first compressed during decoding: that compression
    equals the policy applied to one plain pass over prompt + the tokens fed so far, whose
    last WINDOW queries are the decode steps' own."""
    ids = long_prompts[0]
    budget = len(ids) + 20
    policy = GKVPolicy(window=WINDOW, interval=INTERVAL)
    result = generate_gkv(reference_model, ids, policy, budget, INTERVAL + 2, stop_token_ids=[])
    assert [e.forward_index for e in result.evictions] == [INTERVAL]
    eviction = result.evictions[0]
    fed = ids + result.token_ids[:INTERVAL]
    assert eviction.num_tokens == len(fed) and eviction.resident == len(fed)
    recorded = full_prefill_record(reference_model, fed, WINDOW)
    scale = reference_model.model.layers[0].self_attn.scaling
    for layer, kept in enumerate(eviction.kept):
        expected = policy.compress(recorded.queries[layer], recorded.keys[layer], scale, budget, None).kept
        assert torch.equal(kept, expected), f"layer {layer}"
        assert torch.equal(eviction.kept_positions[layer], kept)


def test_judgeq_prefill_then_gkv(reference_model, soft_tokens, long_prompts):
    """judgeq+gkv: Judge Q's prefill (same kept sets and first tokens as the prefill-only
    reference), then G-KV from pass INTERVAL on, starting from the Judge Q kept rows."""
    ids = long_prompts[0]
    judgeq = make_policy("judgeq", soft_tokens=soft_tokens)
    policy = GKVPolicy(window=WINDOW, interval=INTERVAL)
    result = generate_gkv(reference_model, ids, policy, BUDGET, 2 * INTERVAL + 1, stop_token_ids=[], prefill_policy=judgeq)
    prefill_only = generate(reference_model, ids, judgeq, KVBudget(tokens=BUDGET), 2 * INTERVAL + 1, stop_token_ids=[])
    for ours, theirs in zip(result.prefill_kept, prefill_only.kept_indices):
        assert torch.equal(ours, theirs)
    # pass INTERVAL still attends over the uncompressed cache: its token too is unchanged
    assert result.token_ids[: INTERVAL + 1] == prefill_only.token_ids[: INTERVAL + 1]
    assert [e.forward_index for e in result.evictions] == [INTERVAL, 2 * INTERVAL]
    first = result.evictions[0]
    for layer, positions in enumerate(first.kept_positions):
        old = positions[:, :-WINDOW]
        judged = result.prefill_kept[layer]
        # every kept row is a Judge Q survivor or a fed token
        for head in range(old.shape[0]):
            assert set(old[head].tolist()) <= set(judged[head].tolist()) | set(range(len(ids), first.num_tokens))


def test_global_score_memory_changes_later_choices(gkv_run, reference_model, long_prompts):
    """Without the decayed memory (alpha 0, the local score alone) the later compressions
    choose differently; the prefill one, which has no memory yet, is identical."""
    memoryless = generate_gkv(
        reference_model, long_prompts[0], GKVPolicy(window=WINDOW, interval=INTERVAL, alpha=0.0), BUDGET, 2 * INTERVAL + 1,
        stop_token_ids=[],
    )
    for ours, theirs in zip(gkv_run.evictions[0].kept, memoryless.evictions[0].kept):
        assert torch.equal(ours, theirs)
    second = zip(gkv_run.evictions[1].kept, memoryless.evictions[1].kept)
    assert any(not torch.equal(ours, theirs) for ours, theirs in second)


def test_bad_arguments(reference_model, long_prompts):
    with pytest.raises(ValueError, match="must exceed the window"):
        generate_gkv(reference_model, long_prompts[0], GKVPolicy(), 16, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_gkv(reference_model, long_prompts[0], GKVPolicy(), 64, 0)
