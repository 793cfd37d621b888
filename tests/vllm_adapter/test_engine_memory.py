"""Blocks really go back to the pool, prefix caching and preemption stay correct.

One small engine (snapkv, budget 64, 64-token chunks, a 28-block pool, prefix caching
on) driven step by step through ``LLMEngine.step``, in-process.
"""

import pytest
from engine_helpers import (
    abort_mid_prefill_and_mid_decode,
    add,
    block_row,
    engine_core,
    free_blocks,
    greedy,
    make_llm,
    run_counting_preemptions,
    shutdown,
)

from judgeq_vllm.policies import KVBudget, make_policy
from judgeq_vllm.vllm_adapter import llm_kwargs, plan_request

BUDGET = 64
NUM_BLOCKS = 28


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    llm = make_llm(
        smollm2_dir, llm_kwargs("snapkv", BUDGET), max_model_len=400, max_num_batched_tokens=64,
        num_gpu_blocks_override=NUM_BLOCKS, enable_prefix_caching=True,
    )
    yield llm
    shutdown(llm)


def plan_for(prompt):
    return plan_request(len(prompt), make_policy("snapkv"), KVBudget(tokens=BUDGET), 16, num_layers=30)


def test_compaction_step_frees_exactly_the_planned_blocks(llm, engine_prompts):
    prompt = engine_prompts[10]
    plan = plan_for(prompt)
    start = free_blocks(llm)
    engine_id = add(llm, "free-exact", prompt, max_tokens=8)
    scheduler = engine_core(llm).scheduler
    freed_steps = []
    while llm.llm_engine.has_unfinished_requests():
        request = scheduler.requests.get(engine_id)
        computed_before = request.num_computed_tokens if request else None
        row_before = list(block_row(llm, engine_id))
        free_before = free_blocks(llm)
        llm.llm_engine.step()
        request = scheduler.requests.get(engine_id)
        if request is None:
            break
        row = block_row(llm, engine_id)
        freed = free_blocks(llm) - (free_before - (len(row) - len(row_before)))
        # blocks that hold (or will hold) compacted rows are never hashed for prefix caching
        assert all(block.block_hash is None for block in row[plan.freed_blocks :])
        if freed:
            freed_steps.append((computed_before, request.num_computed_tokens, freed))
            assert all(block.is_null for block in row[: plan.freed_blocks])
            assert not any(block.is_null for block in row[plan.freed_blocks :])
            # the freed head keeps its true prompt KV and hashes: reusable by prefix caching
            assert all(block.block_hash is not None for block in row_before[: plan.freed_blocks])
    # exactly one step freed blocks: the one whose chunk ended the prompt, by the plan's count
    assert len(freed_steps) == 1 and freed_steps[0][1] == plan.total_len and freed_steps[0][2] == plan.freed_blocks
    assert plan.freed_blocks == (len(prompt) - BUDGET) // 16
    assert free_blocks(llm) == start


def test_aborted_requests_return_every_block(llm, engine_prompts):
    start = free_blocks(llm)
    abort_mid_prefill_and_mid_decode(llm, engine_prompts[9], engine_prompts[11])
    scheduler = engine_core(llm).scheduler
    assert not scheduler.eviction_plans and not scheduler.compaction_scheduled
    assert free_blocks(llm) == start


def test_identical_prompt_reuses_only_the_head_blocks(llm, engine_prompts):
    prompt = engine_prompts[10]
    plan = plan_for(prompt)
    first = greedy(llm, [prompt])[0]
    second = greedy(llm, [prompt])[0]
    assert second.num_cached_tokens == plan.prefix_hit_cap > 0
    assert list(second.outputs[0].token_ids) == list(first.outputs[0].token_ids)


def test_preemption_gives_the_unpreempted_outputs(llm, engine_prompts):
    # short prompts are admitted together under vLLM's own admission; compacted to 4-5
    # blocks each, their answers then outgrow the pool
    alone, together, preempted, _ = run_counting_preemptions(llm, engine_prompts[3:7], admission_horizon=0)
    assert preempted, "the pool is meant to force preemption"
    assert together == alone


def test_admission_horizon_admits_only_what_fits_ahead(llm, engine_prompts):
    # the same load admitted only where it fits the pool for 80 decode tokens ahead:
    # fewer run at once, none is preempted, and the outputs are the same
    prompts = engine_prompts[3:7]
    _, _, _, most_running_unreserved = run_counting_preemptions(llm, prompts, admission_horizon=0)
    alone, together, preempted, most_running = run_counting_preemptions(llm, prompts, admission_horizon=80)
    assert not preempted
    assert most_running < most_running_unreserved
    assert together == alone
