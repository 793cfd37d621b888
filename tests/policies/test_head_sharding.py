"""Tensor parallelism's premise (docs/tensor-parallel-design.md): every policy decides each
kv head from that head's keys and its own group of query heads alone, so a rank that holds a
contiguous share of the heads keeps exactly what one GPU keeps for those heads."""

import pytest
import torch

from judgeq_vllm.policies import GKVPolicy, ScoreInputs, make_policy
from judgeq_vllm.soft_tokens import SoftTokens

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, PROMPT_LEN, BUDGET, NUM_LAYERS = 12, 4, 64, 300, 64, 12


def shard(tensor: torch.Tensor, rank: int, ranks: int, dim: int) -> torch.Tensor:
    size = tensor.shape[dim] // ranks
    return tensor.narrow(dim, rank * size, size)


@pytest.mark.parametrize("name", ["judgeq", "snapkv", "h2o", "streamingllm", "knorm", "pyramidkv"])
def test_prefill_selection_per_rank_equals_one_gpus(name):
    gen = torch.Generator().manual_seed(0)
    soft = SoftTokens(torch.randn(32, 16, generator=gen), "test", "test") if name == "judgeq" else None
    policy = make_policy(name, soft_tokens=soft) if soft is not None else make_policy(name)
    num_obs = policy.num_observations
    key_len = PROMPT_LEN + (num_obs if name == "judgeq" else 0)
    for layer in (0, 5, 11):
        # scaled so that softmax is peaked and max-pooling makes exact ties
        queries = torch.randn(max(num_obs, 1), NUM_Q_HEADS, HEAD_DIM, generator=gen)[:num_obs] * 3
        keys = torch.randn(NUM_KV_HEADS, key_len, HEAD_DIM, generator=gen) * 3
        one_gpu = policy.select(ScoreInputs(queries, keys, PROMPT_LEN, HEAD_DIM**-0.5, layer, NUM_LAYERS), BUDGET)
        for ranks in (2, 4):
            per_rank = [
                policy.select(ScoreInputs(shard(queries, r, ranks, 1), shard(keys, r, ranks, 0), PROMPT_LEN,
                                          HEAD_DIM**-0.5, layer, NUM_LAYERS), BUDGET)
                for r in range(ranks)
            ]
            assert torch.equal(torch.cat(per_rank), one_gpu), (layer, ranks)


def test_gkv_compression_per_rank_equals_one_gpus():
    gen = torch.Generator().manual_seed(1)
    policy = GKVPolicy(window=16, interval=128)
    for _ in range(5):
        queries = torch.randn(16, NUM_Q_HEADS, HEAD_DIM, generator=gen) * 3
        keys = torch.randn(NUM_KV_HEADS, PROMPT_LEN, HEAD_DIM, generator=gen) * 3
        previous = torch.rand(NUM_KV_HEADS, BUDGET - 16, generator=gen)
        one_gpu = policy.compress(queries, keys, HEAD_DIM**-0.5, BUDGET, previous)
        for ranks in (2, 4):
            per_rank = [
                policy.compress(shard(queries, r, ranks, 1), shard(keys, r, ranks, 0), HEAD_DIM**-0.5, BUDGET,
                                shard(previous, r, ranks, 0))
                for r in range(ranks)
            ]
            assert torch.equal(torch.cat([p.kept for p in per_rank]), one_gpu.kept)
            assert torch.equal(torch.cat([p.global_scores for p in per_rank]), one_gpu.global_scores)
