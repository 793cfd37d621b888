"""G-KV against a loop-based transcription of the authors' code (microsoft/G-KV at 6db3b2e).

``authors_update_kv`` follows ``ScoreBasedKV.update_kv`` (score_based.py) with the G-KV
flags (``enable_score_cache``, ``smooth_method="max"``, ``suppressing_redundancy``, no
pooling, batch 1, no padding); ``authors_attention_scores`` follows
``compute_attention_scores(pooling="max")`` one softmax row at a time;
``authors_similarity`` follows the Triton ``similarity_score_kernel`` block by block
(rows from the last block backwards, a per-column "already zeroed" flag).
"""

import math

import pytest
import torch

from judgeq_vllm.policies.gkv import GKVPolicy

BLOCK_M, BLOCK_N = 16, 64


def authors_attention_scores(query_states, key_states):
    """query [q_heads, q_len, d], key [kv_heads, L, d] -> [kv_heads, q_len, L - q_len]."""
    q_heads, q_len, head_dim = query_states.shape
    kv_heads, kv_len, _ = key_states.shape
    group = q_heads // kv_heads
    keys = key_states.double() / math.sqrt(head_dim)
    out = torch.zeros(kv_heads, q_len, kv_len - q_len, dtype=torch.float64)
    for h in range(kv_heads):
        for i in range(q_len):
            best = None
            for g in range(group):
                logits = keys[h] @ query_states[h * group + g, i].double()
                # triu(q_len, q_len, diagonal=1) on the last q_len keys
                for j in range(q_len):
                    if j > i:
                        logits[kv_len - q_len + j] = float("-inf")
                probs = torch.softmax(logits - logits.max(), dim=0)
                best = probs if best is None else torch.maximum(best, probs)
            out[h, i] = best[: kv_len - q_len]
    return out


def authors_similarity(key_states, threshold=0.5):
    """The Triton kernel's loops, one (head) program at a time; key [kv_heads, L, d] -> [kv_heads, L]."""
    kv_heads, seq_len, _ = key_states.shape
    keys = key_states.double()
    key_norm = keys.norm(dim=-1)
    out = torch.zeros(kv_heads, seq_len, dtype=torch.float64)
    for h in range(kv_heads):
        zero_out = [False] * seq_len
        for m_offset in range(seq_len - BLOCK_M, 0 - BLOCK_M, -BLOCK_M):
            rows = [m for m in range(m_offset, m_offset + BLOCK_M) if 0 <= m < seq_len]
            s = {m: 0.0 for m in rows}
            for n_offset in range(0, seq_len, BLOCK_N):
                columns = [n for n in range(n_offset, n_offset + BLOCK_N) if n < seq_len]
                sim = {}
                for m in rows:
                    km = keys[h, m] / (key_norm[h, m] + 1e-6)
                    for n in columns:
                        kn = keys[h, n] / (key_norm[h, n] + 1e-6)
                        sim[m, n] = 0.0 if m == n else float(km @ kn)
                for n in columns:
                    if zero_out[n]:
                        continue
                    hits = [m for m in rows if sim[m, n] > threshold]
                    if hits:
                        sim[max(hits), n] = 0.0
                        zero_out[n] = True
                for m in rows:
                    s[m] += sum(sim[m, n] for n in columns)
            for m in rows:
                out[h, m] = s[m]
    # cal_similarity_triton: divide by the valid length, softmax over all keys
    return torch.softmax(out / seq_len, dim=-1)


def authors_update_kv(policy, key_states, query_states, budget, score_cache):
    """Returns (kept indices incl. the window, new score cache), as update_kv computes them."""
    window = query_states.shape[1]
    kv_len = key_states.shape[1]
    assert kv_len > budget
    attn_scores = authors_attention_scores(query_states, key_states)
    final_score = attn_scores.mean(dim=1)
    final_score = final_score / final_score.max(dim=-1, keepdim=True).values
    if score_cache is not None and policy.alpha > 0:
        cached_len = score_cache.shape[-1]
        old_score = torch.cat([score_cache.double(), final_score[:, cached_len:]], dim=-1)
        final_score = torch.max(old_score * policy.alpha, final_score)
    similarity_cos = authors_similarity(key_states, policy.similarity_threshold)[:, :-window]
    similarity_cos = similarity_cos / similarity_cos.max(dim=-1, keepdim=True).values
    pooled_score = final_score * policy.mix_lambda - similarity_cos * (1 - policy.mix_lambda)
    indices = pooled_score.topk(budget - window, dim=-1).indices.sort(dim=-1).values
    new_cache = final_score.gather(1, indices)
    kept = torch.cat([indices, torch.arange(kv_len - window, kv_len).expand(key_states.shape[0], -1)], dim=-1)
    return kept, new_cache


def random_layer(num_q_heads, num_kv_heads, num_rows, window, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(window, num_q_heads, head_dim, generator=gen)
    keys = torch.randn(num_kv_heads, num_rows, head_dim, generator=gen)
    # some near-duplicate keys, so the redundancy threshold has something to spare
    for row in range(5, num_rows, 7):
        keys[:, row] = keys[:, row - 1] + 0.1 * torch.randn(num_kv_heads, head_dim, generator=gen)
    return queries, keys


GQA_SHAPES = [(4, 4), (8, 2), (9, 3), (8, 1)]


@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA_SHAPES)
@pytest.mark.parametrize("num_rows", [20, 81, 150])
def test_local_scores_match_authors(num_q_heads, num_kv_heads, num_rows):
    policy = GKVPolicy(window=8, interval=8)
    queries, keys = random_layer(num_q_heads, num_kv_heads, num_rows, 8, seed=num_rows)
    expected = authors_attention_scores(queries.permute(1, 0, 2), keys).mean(dim=1)
    local = policy.local_scores(queries, keys, 1 / math.sqrt(16))
    assert local.shape == (num_kv_heads, num_rows - 8)
    torch.testing.assert_close(local.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_kv_heads", [1, 3])
@pytest.mark.parametrize("num_rows", [17, 70, 130])
def test_redundancy_matches_the_triton_kernel_loops(num_kv_heads, num_rows):
    policy = GKVPolicy(window=4, interval=4)
    _, keys = random_layer(num_kv_heads, num_kv_heads, num_rows, 4, seed=num_rows)
    expected = authors_similarity(keys)[:, :-4]
    expected = expected / expected.max(dim=-1, keepdim=True).values
    torch.testing.assert_close(policy.redundancy_scores(keys).double(), expected, rtol=1e-5, atol=1e-7)


def test_redundancy_spares_the_most_recent_duplicate():
    """Three identical keys a < b < c: per column the last similar row is spared, so a
    counts two duplicates, b one and c (the most recent) none, like a unique key."""
    keys = torch.eye(6)[None].clone()
    keys[0, 3] = keys[0, 1]
    keys[0, 4] = keys[0, 1]
    raw = GKVPolicy(window=1, interval=1).redundancy_scores(keys)[0]
    assert raw[1] == pytest.approx(1.0)
    assert raw[4] < raw[3] < raw[1]
    assert torch.allclose(raw[[0, 2]], raw[4].expand(2))


@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA_SHAPES)
@pytest.mark.parametrize("budget", [24, 60])
def test_first_compression_matches_authors(num_q_heads, num_kv_heads, budget):
    policy = GKVPolicy(window=8, interval=8)
    queries, keys = random_layer(num_q_heads, num_kv_heads, 100, 8, seed=budget)
    result = policy.compress(queries, keys, 1 / math.sqrt(16), budget, previous=None)
    kept, scores = authors_update_kv(policy, keys, queries.permute(1, 0, 2), budget, None)
    assert torch.equal(result.kept, kept)
    torch.testing.assert_close(result.global_scores.double(), scores, rtol=1e-5, atol=1e-7)
    assert result.kept.shape == (num_kv_heads, budget)


def test_repeated_compressions_carry_the_global_score():
    """Three rounds on a growing cache, the authors' score cache threaded through: same
    kept rows and cached scores every round; the carried score changes the choice."""
    policy = GKVPolicy(window=8, interval=16)
    scale, budget = 1 / math.sqrt(16), 40
    queries, keys = random_layer(9, 3, 90, 8, seed=7)
    gen = torch.Generator().manual_seed(11)
    previous = authors_cache = None
    differs = False
    for _ in range(3):
        result = policy.compress(queries, keys, scale, budget, previous)
        kept, authors_cache = authors_update_kv(policy, keys, queries.permute(1, 0, 2), budget, authors_cache)
        assert torch.equal(result.kept, kept)
        torch.testing.assert_close(result.global_scores.double(), authors_cache, rtol=1e-5, atol=1e-7)
        if previous is not None:
            memoryless = policy.compress(queries, keys, scale, budget, None)
            differs |= not torch.equal(memoryless.kept, result.kept)
        previous = result.global_scores
        # the kept rows, then `interval` new rows whose queries form the next window
        keys = torch.cat([keys.gather(1, kept[:, :, None].expand(-1, -1, 16)), torch.randn(3, 16, 16, generator=gen)], dim=1)
        queries = torch.randn(8, 9, 16, generator=gen)
    assert differs


def test_global_score_is_decayed_max_and_new_rows_take_the_local_score():
    policy = GKVPolicy(window=2, interval=2, alpha=0.5)
    local = torch.tensor([[0.2, 1.0, 0.1, 0.3]])
    previous = torch.tensor([[1.0, 0.4]])
    assert torch.equal(policy.global_scores(local, previous), torch.tensor([[0.5, 1.0, 0.1, 0.3]]))
    assert torch.equal(policy.global_scores(local, None), local)


def test_compression_schedule():
    policy = GKVPolicy(interval=128)
    assert policy.compresses_at(0, 600, 512)  # the prefill of a long prompt
    assert not policy.compresses_at(0, 512, 512)
    assert not policy.compresses_at(100, 700, 512)
    assert policy.compresses_at(256, 640, 512)


@pytest.mark.parametrize(
    "knobs,message",
    [({"window": 0}, "window"), ({"window": 16, "interval": 8}, "interval"), ({"alpha": 1.5}, "alpha"), ({"mix_lambda": -0.1}, "mix_lambda")],
)
def test_bad_knobs(knobs, message):
    with pytest.raises(ValueError, match=message):
        GKVPolicy(**knobs)


def test_budget_must_exceed_window():
    queries, keys = random_layer(4, 2, 40, 16)
    with pytest.raises(ValueError, match="must exceed the window"):
        GKVPolicy().compress(queries, keys, 0.25, 16, None)
