"""The plan arithmetic and the chunk rule, without an engine."""

from types import SimpleNamespace

import pytest

from judgeq_vllm.policies import KVBudget, make_policy
from judgeq_vllm.soft_tokens import SoftTokens
from judgeq_vllm.vllm_adapter.plan import EvictionPlan, plan_request
from judgeq_vllm.vllm_adapter.scheduler import EvictionSchedulerMixin

BLOCK = 16


def soft(n):
    import torch

    return SoftTokens(torch.zeros(n, 8), "test", "test")


def test_plan_matches_the_probe():
    """docs/engine-design.md probe B: P=126, 4 soft tokens, k=40, bs=16."""
    plan = EvictionPlan(prompt_len=126, num_soft=4, num_observations=4, budget_keep=40, layer_keeps=(40,) * 30, block_size=16)
    assert (plan.total_len, plan.first_kept_slot, plan.slot_shift, plan.freed_blocks) == (130, 80, 10, 5)
    assert plan.uniform and plan.keep == 40
    assert [plan.layer_evicted_len(layer) for layer in (0, 29)] == [90, 90]
    assert plan.layer_slot_shift(7) == plan.slot_shift
    assert plan.last_chunk_start == 125
    assert plan.prefix_hit_cap == 80


@pytest.mark.parametrize(
    "name, knobs, num_soft, num_obs",
    [("judgeq", {"soft_tokens": soft(32)}, 32, 32), ("snapkv", {}, 0, 32), ("h2o", {"window": 8}, 0, 8),
     ("streamingllm", {}, 0, 0), ("knorm", {}, 0, 0)],
)
def test_plan_per_policy(name, knobs, num_soft, num_obs):
    policy = make_policy(name, **knobs)
    plan = plan_request(1000, policy, KVBudget(tokens=64), BLOCK, num_layers=30)
    assert (plan.num_soft, plan.num_observations, plan.keep, plan.budget_keep) == (num_soft, num_obs, 64, 64)
    # kept rows and the new tokens fit in the blocks left after the freed head
    assert 0 <= plan.slot_shift < BLOCK
    assert plan.first_kept_slot + plan.keep + plan.slot_shift == plan.total_len
    assert plan.freed_blocks == (1000 + num_soft - 64) // BLOCK
    assert plan.prefix_hit_cap <= min(plan.first_kept_slot, plan.last_chunk_start)


def test_per_layer_budgets_share_blocks_sized_for_the_largest_layer():
    policy = make_policy("pyramidkv")
    plan = plan_request(1000, policy, KVBudget(tokens=128), BLOCK, num_layers=30)
    assert plan.layer_keeps == tuple(policy.layer_keep_count(128, 1000, layer, 30) for layer in range(30))
    assert not plan.uniform
    assert plan.keep == plan.layer_keeps[0] > plan.layer_keeps[-1]
    assert plan.freed_blocks == (1000 - plan.keep) // BLOCK
    for layer, keep in enumerate(plan.layer_keeps):
        # every layer's kept rows and later tokens stay inside the blocks that are not freed
        assert plan.layer_slot_shift(layer) >= plan.slot_shift >= 0
        assert plan.first_kept_slot + keep + plan.layer_slot_shift(layer) == plan.total_len
        assert plan.layer_evicted_len(layer) == 1000 - keep


def test_prompt_within_budget_has_no_plan():
    policy = make_policy("snapkv")
    assert plan_request(64, policy, KVBudget(tokens=64), BLOCK, 30) is None
    assert plan_request(65, policy, KVBudget(tokens=64), BLOCK, 30) is not None
    assert plan_request(100, policy, KVBudget(ratio=0.5), BLOCK, 30).keep == 50


def test_window_longer_than_prompt_observes_the_whole_prompt():
    plan = plan_request(20, make_policy("snapkv", window=32), KVBudget(tokens=10), BLOCK, 30)
    assert plan.num_observations == 20 and plan.last_chunk_start == -1 and plan.prefix_hit_cap == 0


def chunks(plan, budget, start=0, total=None):
    """Chunk boundaries the scheduler hook produces with ``budget`` tokens per step."""
    scheduler = SimpleNamespace(eviction_plans={"r": plan})
    total = plan.total_len if total is None else total
    request = SimpleNamespace(request_id="r", num_computed_tokens=start)
    ends, stalls = [], 0
    while request.num_computed_tokens < total:
        asked = min(budget, total - request.num_computed_tokens)
        granted = EvictionSchedulerMixin._mamba_block_aligned_split(scheduler, request, asked)
        assert 0 <= granted <= asked
        if granted == 0:
            stalls += 1
            assert stalls < 3, "the chunk rule stalls with a full token budget"
            budget = total  # a later step with more budget
            continue
        request.num_computed_tokens += granted
        ends.append(request.num_computed_tokens)
    return ends


# token budgets below num_obs + 1 are refused at start-up (config.validate_engine)
CHUNK_CASES = [
    (budget, num_obs, num_soft)
    for budget in (7, 16, 33, 64, 100, 129, 1000)
    for num_obs, num_soft in ((32, 32), (32, 0), (0, 0))
    if budget >= num_obs + 1
]


@pytest.mark.parametrize("budget, num_obs, num_soft", CHUNK_CASES)
def test_the_last_prompt_chunk_holds_every_observation_query(budget, num_obs, num_soft):
    plan = EvictionPlan(prompt_len=300, num_soft=num_soft, num_observations=num_obs, budget_keep=64, layer_keeps=(64,), block_size=BLOCK)
    ends = chunks(plan, budget)
    assert ends[-1] == plan.total_len
    last_start = ends[-2] if len(ends) > 1 else 0
    assert last_start <= plan.last_chunk_start
    assert not any(plan.last_chunk_start < end < plan.total_len for end in ends)


def test_a_resumed_request_compacts_before_its_generated_tokens():
    plan = EvictionPlan(prompt_len=300, num_soft=32, num_observations=32, budget_keep=64, layer_keeps=(64,), block_size=BLOCK)
    ends = chunks(plan, 4096, total=plan.total_len + 20)
    assert ends == [plan.total_len, plan.total_len + 20]
