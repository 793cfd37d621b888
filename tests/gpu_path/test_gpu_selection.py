"""The GPU path's batched scoring + selection against each policy's own ``select``.

Paged fp32 caches with random block tables, two jobs of different prompt lengths in one
step, against ``EvictionPolicy.select`` on dense keys. Max-pooling makes plateaus of equal
scores, and top-k breaks such ties by implementation, so the check is that both kept sets
are equally good under the reference's scores (same sorted scores per head), and the
kept sets are identical where the reference's scores have no tie at the cut. Runs in the
Triton interpreter on CPU.
"""

import pytest
import torch

from judgeq_vllm.policies import make_policy
from judgeq_vllm.policies.base import ScoreInputs
from judgeq_vllm.kernels import compact_paged
from judgeq_vllm.soft_tokens import SoftTokens
from judgeq_vllm.vllm_adapter.gpu.selection import build_jobs, score_layer, select_kept
from judgeq_vllm.vllm_adapter.plan import plan_request
from judgeq_vllm.policies import KVBudget

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK_SIZE, NUM_KV_HEADS, GROUP, HEAD_DIM, NUM_BLOCKS = 16, 2, 3, 32, 96
SCALE = HEAD_DIM**-0.5


def make_policy_named(name):
    if name == "judgeq":
        return make_policy("judgeq", soft_tokens=SoftTokens(torch.zeros(8, 4), "test", "test"))
    if name == "snapkv":
        return make_policy("snapkv", window=8)
    if name == "h2o":
        return make_policy("h2o", window=8)
    return make_policy(name)


@pytest.mark.parametrize("name", ["judgeq", "snapkv", "h2o", "streamingllm", "knorm"])
@pytest.mark.parametrize("budget", [40, 0.5])
def test_selection_equals_policy_select(name, budget):
    torch.manual_seed(0)
    policy = make_policy_named(name)
    plans = [plan_request(p, policy, KVBudget.parse(budget), BLOCK_SIZE, 1) for p in (150, 97)]
    cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, device=DEVICE)
    rows = torch.randperm(NUM_BLOCKS, device=DEVICE).int().view(2, -1)
    # the step: job 0's chunk is tokens [0, 60) of the flat order, job 1's [60, 110)
    chunk_lens = (60, 50)
    query = torch.randn(sum(chunk_lens), NUM_KV_HEADS * GROUP, HEAD_DIM, device=DEVICE)
    query_ends = [60, 110]
    jobs = build_jobs(policy, ["a", "b"], plans, query_ends, rows, DEVICE)
    kept = select_kept(score_layer(policy, jobs, query, cache, SCALE), jobs, 0)
    for j, plan in enumerate(plans):
        t = torch.arange(plan.total_len, device=DEVICE)
        keys = cache[rows[j, t // BLOCK_SIZE].long(), :, t % BLOCK_SIZE, :HEAD_DIM].transpose(0, 1)
        obs = query[query_ends[j] - plan.num_observations : query_ends[j]]
        inputs = ScoreInputs(obs.cpu(), keys.cpu(), plan.prompt_len, SCALE)
        expected = policy.select(inputs, plan.budget_keep)
        ours = kept[j, :, : plan.keep].cpu()
        assert expected.shape[1] == plan.keep
        assert bool((ours[:, 1:] > ours[:, :-1]).all()), "kept indices must be sorted and unique"
        ranked = policy.score(inputs).masked_fill(policy.protected_mask(plan.prompt_len), float("inf"))
        for head in range(NUM_KV_HEADS):
            ours_scores = ranked[head, ours[head]].sort().values
            expected_scores = ranked[head, expected[head]].sort().values
            torch.testing.assert_close(ours_scores, expected_scores, rtol=1e-5, atol=1e-7)
            cut = ranked[head].sort(descending=True).values
            if cut[plan.keep - 1] != cut[plan.keep]:
                assert torch.equal(ours[head], expected[head]), f"job {j} head {head}"


def test_protected_tokens_beyond_the_budget_keep_the_most_recent():
    """A ratio budget below SnapKV's window keeps the most recent window tokens (select_keep's rule)."""
    policy = make_policy("snapkv", window=32)
    plan = plan_request(40, policy, KVBudget.parse(0.9), BLOCK_SIZE, 1)
    assert plan.keep == 3
    cache = torch.randn(8, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, device=DEVICE)
    rows = torch.arange(8, device=DEVICE).int()[None]
    query = torch.randn(40, NUM_KV_HEADS * GROUP, HEAD_DIM, device=DEVICE)
    jobs = build_jobs(policy, ["a"], [plan], [40], rows, DEVICE)
    kept = select_kept(score_layer(policy, jobs, query, cache, SCALE), jobs, 0)
    assert kept[0].tolist() == [[37, 38, 39]] * NUM_KV_HEADS


def test_per_layer_budgets_select_and_compact_each_layer():
    """PyramidKV: each layer keeps its own k_l (policy.select with that layer), and one
    compact_paged over all layers moves k_l rows of each job to [S, S + k_l)."""
    torch.manual_seed(0)
    num_layers = 3
    policy = make_policy("pyramidkv", window=8)
    plans = [plan_request(p, policy, KVBudget(tokens=40), BLOCK_SIZE, num_layers) for p in (150, 97)]
    assert not any(plan.uniform for plan in plans)
    caches = [torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, device=DEVICE) for _ in range(num_layers)]
    originals = [cache.clone() for cache in caches]
    rows = torch.randperm(NUM_BLOCKS, device=DEVICE).int().view(2, -1)
    query_ends = [60, 110]
    jobs = build_jobs(policy, ["a", "b"], plans, query_ends, rows, DEVICE)
    assert jobs.num_kept.shape == (num_layers, 2)
    kept_by_layer = []
    for layer, cache in enumerate(caches):
        query = torch.randn(110, NUM_KV_HEADS * GROUP, HEAD_DIM, device=DEVICE)
        kept = select_kept(score_layer(policy, jobs, query, cache, SCALE), jobs, layer)
        kept_by_layer.append(kept)
        for j, plan in enumerate(plans):
            t = torch.arange(plan.total_len, device=DEVICE)
            keys = cache[rows[j, t // BLOCK_SIZE].long(), :, t % BLOCK_SIZE, :HEAD_DIM].transpose(0, 1)
            obs = query[query_ends[j] - plan.num_observations : query_ends[j]]
            inputs = ScoreInputs(obs.cpu(), keys.cpu(), plan.prompt_len, SCALE, layer_idx=layer, num_layers=num_layers)
            expected = policy.select(inputs, plan.budget_keep)
            assert expected.shape[1] == plan.layer_keeps[layer]
            ranked = policy.score(inputs).masked_fill(policy.protected_mask(plan.prompt_len), float("inf"))
            ours = kept[j, :, : plan.layer_keeps[layer]].cpu()
            for head in range(NUM_KV_HEADS):
                torch.testing.assert_close(
                    ranked[head, ours[head]].sort().values, ranked[head, expected[head]].sort().values,
                    rtol=1e-5, atol=1e-7,
                )
    compact_paged(caches, jobs.block_rows, torch.stack(kept_by_layer), jobs.num_kept, dest_start=jobs.dest_start)
    for layer, cache in enumerate(caches):
        for j, plan in enumerate(plans):
            keep = plan.layer_keeps[layer]
            dest = plan.first_kept_slot + torch.arange(keep, device=DEVICE)
            got = cache[rows[j, dest // BLOCK_SIZE].long(), :, dest % BLOCK_SIZE]  # [k_l, H, 2D]
            src = kept_by_layer[layer][j, :, :keep]  # [H, k_l]
            for head in range(NUM_KV_HEADS):
                want = originals[layer][rows[j, src[head] // BLOCK_SIZE].long(), head, src[head] % BLOCK_SIZE]
                assert torch.equal(got[:, head], want), f"layer {layer} job {j} head {head}"
