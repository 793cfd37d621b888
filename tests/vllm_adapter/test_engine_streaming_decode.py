"""streamingllm-decode in the engine against the HF reference, and its block accounting.

One engine (budget 112, interval 32, 4 sinks, fp32, block size 16), in-process, on G-KV's
event machinery with the prompts of ``test_engine_gkv.py``: 140 tokens (compressed at the
prefill, then every 32 steps) and 100 tokens (within the budget: first compressed during
decoding, at 132 tokens).
"""

import pytest
import torch
from engine_helpers import (
    BLOCK_SIZE,
    add,
    block_row,
    engine_core,
    free_blocks,
    greedy,
    greedy_recording_events,
    make_llm,
    model_runner,
    shutdown,
    step_checking_event_blocks,
)

from judgeq_vllm.policies import StreamingLLMDecodePolicy
from judgeq_vllm.reference import generate_gkv
from judgeq_vllm.vllm_adapter import llm_kwargs

POLICY = "streamingllm-decode"
BUDGET, INTERVAL, SINKS = 112, 32, 4
NEW_TOKENS = 130
PROMPT_INDICES = [4, 0]  # 140 and 100 tokens
# blocks a request may hold between events: b + interval rows, S_i alignment, one block early
MAX_RESIDENT_BLOCKS = -(-(BUDGET + INTERVAL) // BLOCK_SIZE) + 2


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    llm = make_llm(smollm2_dir, llm_kwargs(POLICY, BUDGET, decode_interval=INTERVAL), max_num_batched_tokens=256)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def references(reference_model, engine_prompts):
    policy = StreamingLLMDecodePolicy(sinks=SINKS, interval=INTERVAL)
    return [
        generate_gkv(reference_model, engine_prompts[i], policy, BUDGET, NEW_TOKENS, stop_token_ids=[])
        for i in PROMPT_INDICES
    ]


def test_engine_keeps_what_the_reference_keeps(llm, engine_prompts, references):
    runner = model_runner(llm)
    outputs, recorder = greedy_recording_events(llm, [engine_prompts[i] for i in PROMPT_INDICES], NEW_TOKENS)
    # G-KV's schedule: the 140-token prompt at the prefill and 4 decode events, the 100-token one 4 decode events
    assert [e.num_tokens for e in references[0].evictions] == [140, 172, 204, 236, 268]
    assert [e.num_tokens for e in references[1].evictions] == [132, 164, 196, 228]
    num_layers = len(references[0].evictions[0].kept)
    for output, reference in zip(outputs, references):
        assert list(output.outputs[0].token_ids) == reference.token_ids
        events = recorder.for_request(output.request_id)
        assert sorted(events) == [eviction.num_tokens for eviction in reference.evictions]
        for eviction in reference.evictions:
            assert sorted(events[eviction.num_tokens]) == list(range(num_layers))
            for layer, expected in enumerate(eviction.kept):
                got = events[eviction.num_tokens][layer]
                assert torch.equal(got, expected), (eviction.num_tokens, layer)
                assert torch.equal(got[:, :SINKS], torch.arange(SINKS).expand(got.shape[0], -1))
    # no query window was captured and no score kept
    assert not runner.gkv_state.windows and not runner.gkv_state.scores


def test_blocks_freed_at_every_event_and_resident_stays_bounded(llm, engine_prompts):
    """Stepping one long generation: each event's step frees exactly the blocks below its
    new first kept slot, the request never holds more than b + interval rows' blocks after
    its first event, and the pool is whole again at the end."""
    prompt = engine_prompts[4]
    scheduler = engine_core(llm).scheduler
    start = free_blocks(llm)
    engine_id = add(llm, "long-streaming", prompt, max_tokens=300)
    freed_at = step_checking_event_blocks(llm, engine_id, scheduler.gkv_schedules[engine_id], MAX_RESIDENT_BLOCKS)
    # the prefill event, then one every INTERVAL steps while blocks empty
    assert freed_at[0] == len(prompt) and len(freed_at) >= 6
    assert all(b - a == INTERVAL for a, b in zip(freed_at, freed_at[1:]))
    assert free_blocks(llm) == start
    assert not scheduler.gkv_schedules and not scheduler.gkv_events_scheduled


def test_aborts_between_events_and_mid_prefill_leak_nothing(llm, engine_prompts):
    scheduler = engine_core(llm).scheduler
    start = free_blocks(llm)
    decoding = add(llm, "abort-decoding", engine_prompts[4], max_tokens=200)
    schedule = scheduler.gkv_schedules[decoding]
    # past the prefill event and the first decode event, before the next
    target = schedule.next_event(schedule.first_event) + INTERVAL // 2
    while scheduler.requests[decoding].num_computed_tokens < target:
        llm.llm_engine.step()
    mid_prefill = add(llm, "abort-prefill", engine_prompts[13], max_tokens=200)
    llm.llm_engine.step()
    assert 0 < scheduler.requests[mid_prefill].num_computed_tokens < len(engine_prompts[13])
    # its events have freed its head already
    assert block_row(llm, decoding)[0].is_null
    llm.llm_engine.abort_request(["abort-decoding", "abort-prefill"])
    keeper = add(llm, "after-abort", engine_prompts[0], max_tokens=2)
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    assert keeper not in scheduler.requests
    assert free_blocks(llm) == start
    assert not scheduler.gkv_schedules and not scheduler.gkv_events_scheduled


def test_requests_choose_the_engines_policy_or_none(llm, engine_prompts):
    """Per request, ``kv_eviction`` names this engine's policy (the default) or ``none``."""
    stats = engine_core(llm).scheduler.eviction_stats
    prompt = engine_prompts[4]  # 140 tokens: events at 140 and 172 within 40 tokens
    before = stats.decode_compactions
    greedy(llm, [prompt], max_tokens=40, ignore_eos=True, extra_args={"kv_eviction": "none"})
    assert stats.decode_compactions == before
    assert stats.requests_skipped["off_by_request"] == 1
    greedy(llm, [prompt], max_tokens=40, ignore_eos=True, extra_args={"kv_eviction": POLICY})
    assert stats.decode_compactions == before + 2
