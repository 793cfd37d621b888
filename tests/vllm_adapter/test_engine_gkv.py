"""G-KV decode-time eviction in the engine against the HF reference, and its block accounting.

One engine (``gkv``, budget 112, interval 32, window 16, fp32, block size 16), in-process.
Two prompts: 140 tokens (compressed at the prefill, then every 32 steps) and 100 tokens
(within the budget: first compressed during decoding, at 132 tokens).
"""

import pytest
import torch
from engine_helpers import (
    BLOCK_SIZE,
    add,
    engine_core,
    free_blocks,
    greedy,
    greedy_recording_events,
    make_llm,
    model_runner,
    run_counting_preemptions,
    shutdown,
    step_checking_event_blocks,
)

from judgeq_vllm.policies import GKVPolicy
from judgeq_vllm.reference import generate_gkv
from judgeq_vllm.vllm_adapter import llm_kwargs
from judgeq_vllm.vllm_adapter.step import GKVEventRecorder

BUDGET, INTERVAL, WINDOW = 112, 32, 16
NEW_TOKENS = 130
PROMPT_INDICES = [4, 0]  # 140 and 100 tokens
# blocks a request may hold between events: b + interval rows, S_i alignment, one block early
MAX_RESIDENT_BLOCKS = -(-(BUDGET + INTERVAL) // BLOCK_SIZE) + 2


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    llm = make_llm(smollm2_dir, llm_kwargs("gkv", BUDGET, decode_interval=INTERVAL), max_num_batched_tokens=256)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def references(reference_model, engine_prompts):
    policy = GKVPolicy(window=WINDOW, interval=INTERVAL)
    return [
        generate_gkv(reference_model, engine_prompts[i], policy, BUDGET, NEW_TOKENS, stop_token_ids=[])
        for i in PROMPT_INDICES
    ]


def test_engine_keeps_what_the_reference_keeps(llm, engine_prompts, references):
    outputs, recorder = greedy_recording_events(llm, [engine_prompts[i] for i in PROMPT_INDICES], NEW_TOKENS)
    same_sets = total_sets = 0
    differing = []
    for output, reference in zip(outputs, references):
        assert list(output.outputs[0].token_ids) == reference.token_ids
        events = recorder.for_request(output.request_id)
        assert sorted(events) == [eviction.num_tokens for eviction in reference.evictions]
        for eviction in reference.evictions:
            layers = events[eviction.num_tokens]
            assert sorted(layers) == list(range(len(eviction.kept)))
            for layer, expected in enumerate(eviction.kept):
                assert layers[layer].shape == expected.shape
                for head in range(expected.shape[0]):
                    total_sets += 1
                    same = torch.equal(layers[layer][head], expected[head])
                    same_sets += same
                    if not same:
                        differing.append((eviction.num_tokens, layer, head))
    # the 140-token prompt: the prefill and 4 decode events; the 100-token one: 4 decode events
    assert [e.num_tokens for e in references[0].evictions] == [140, 172, 204, 236, 268]
    assert [e.num_tokens for e in references[1].evictions] == [132, 164, 196, 228]
    assert total_sets == 9 * 30 * 3
    assert same_sets == total_sets, f"kept sets differ at (event, layer, head) {differing}"


def test_identical_prompt_reuses_only_blocks_no_event_rewrites(llm, engine_prompts):
    """Prefix caching: blocks from the first compaction's S on are never hashed, so a second
    identical prompt hits only the head below it, and decodes the same tokens."""
    scheduler = engine_core(llm).scheduler
    for index in PROMPT_INDICES:
        prompt = engine_prompts[index]
        first = greedy(llm, [prompt], max_tokens=40, ignore_eos=True)[0]
        second = greedy(llm, [prompt], max_tokens=40, ignore_eos=True)[0]
        assert not scheduler.gkv_schedules
        # 140 tokens: S of the prefill event; 100 tokens: S of the event at 132; both 16
        assert second.num_cached_tokens == 16
        assert list(second.outputs[0].token_ids) == list(first.outputs[0].token_ids)


def test_blocks_freed_at_every_event_and_resident_stays_bounded(llm, engine_prompts):
    """Stepping one long generation: each event's step frees exactly the blocks below its
    new first kept slot, the request never holds more than b + interval rows' blocks after
    its first event, and the pool is whole again at the end."""
    prompt = engine_prompts[4]
    scheduler = engine_core(llm).scheduler
    start = free_blocks(llm)
    engine_id = add(llm, "long-gkv", prompt, max_tokens=300)
    freed_at = step_checking_event_blocks(llm, engine_id, scheduler.gkv_schedules[engine_id], MAX_RESIDENT_BLOCKS)
    # the prefill event, then one every INTERVAL steps while blocks empty
    assert freed_at[0] == len(prompt) and len(freed_at) >= 6
    assert all(b - a == INTERVAL for a, b in zip(freed_at, freed_at[1:]))
    assert free_blocks(llm) == start
    assert not scheduler.gkv_schedules and not scheduler.gkv_events_scheduled
    assert not model_runner(llm).gkv_state.windows


def test_aborts_mid_window_and_mid_prefill_leak_nothing(llm, engine_prompts):
    scheduler = engine_core(llm).scheduler
    start = free_blocks(llm)
    in_window = add(llm, "abort-window", engine_prompts[4], max_tokens=200)
    schedule = scheduler.gkv_schedules[in_window]
    # stop inside a window: some of the next event's queries are captured, the event has not run
    target = schedule.next_event(schedule.first_event) - WINDOW // 2
    while scheduler.requests[in_window].num_computed_tokens < target:
        llm.llm_engine.step()
    mid_prefill = add(llm, "abort-prefill", engine_prompts[13], max_tokens=200)
    llm.llm_engine.step()
    assert in_window in model_runner(llm).gkv_state.windows
    assert 0 < scheduler.requests[mid_prefill].num_computed_tokens < len(engine_prompts[13])
    llm.llm_engine.abort_request(["abort-window", "abort-prefill"])
    # the next step that runs the model drops the aborted requests' windows
    keeper = add(llm, "after-abort", engine_prompts[0], max_tokens=2)
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    assert keeper not in scheduler.requests
    assert free_blocks(llm) == start
    assert not scheduler.gkv_schedules and not scheduler.gkv_events_scheduled
    assert not model_runner(llm).gkv_state.windows


def test_judgeq_then_gkv_keeps_what_the_reference_keeps(smollm2_dir, reference_model, soft_tokens, soft_tokens_path, engine_prompts):
    """judgeq+gkv: Judge Q's soft tokens and compaction at the prefill, then G-KV events
    every INTERVAL steps (vLLM counts the soft tokens, the reference does not)."""
    from judgeq_vllm.policies import make_policy
    from judgeq_vllm.vllm_adapter.step import KeptIndexRecorder

    prompt = engine_prompts[4]
    reference = generate_gkv(
        reference_model, prompt, GKVPolicy(window=WINDOW, interval=INTERVAL), BUDGET, NEW_TOKENS, stop_token_ids=[],
        prefill_policy=make_policy("judgeq", soft_tokens=soft_tokens),
    )
    assert [e.num_tokens for e in reference.evictions] == [172, 204, 236, 268]
    engine = make_llm(
        smollm2_dir, llm_kwargs("judgeq+gkv", BUDGET, soft_tokens=soft_tokens_path, decode_interval=INTERVAL),
        max_num_batched_tokens=256,
    )
    try:
        runner = model_runner(engine)
        prefill_recorder = runner.kept_index_recorder = KeptIndexRecorder()
        recorder = runner.gkv_event_recorder = GKVEventRecorder()
        start = free_blocks(engine)
        (output,) = greedy(engine, [prompt], max_tokens=NEW_TOKENS, ignore_eos=True)
        assert free_blocks(engine) == start
        num_soft = soft_tokens.num_tokens
    finally:
        shutdown(engine)
    assert list(output.outputs[0].token_ids) == reference.token_ids
    prefill_kept = prefill_recorder.for_request(output.request_id)
    for layer, expected in enumerate(reference.prefill_kept):
        assert torch.equal(prefill_kept[layer], expected), f"Judge Q prefill, layer {layer}"
    events = recorder.for_request(output.request_id)
    assert sorted(events) == [e.num_tokens + num_soft for e in reference.evictions]
    for eviction in reference.evictions:
        for layer, expected in enumerate(eviction.kept):
            assert torch.equal(events[eviction.num_tokens + num_soft][layer], expected), (eviction.num_tokens, layer)


def test_preempted_requests_replay_their_events(smollm2_dir, engine_prompts):
    """A pool too small for six G-KV requests at once: preempted requests are prefilled
    again with chunks cut at every event, their windows captured from those chunks and
    their events replayed in order, and they give the outputs they give alone."""
    engine = make_llm(
        smollm2_dir, llm_kwargs("gkv", 64, decode_interval=INTERVAL, admission_horizon=0),
        max_model_len=312, max_num_batched_tokens=64, num_gpu_blocks_override=20,
    )
    scheduler = engine_core(engine).scheduler
    preempt = scheduler._preempt_request
    preempted = []

    def counting_preempt(request, timestamp):
        preempted.append(request.request_id)
        preempt(request, timestamp)

    prompts = engine_prompts[:6]
    try:
        start = free_blocks(engine)
        alone = [list(greedy(engine, [p], max_tokens=120, ignore_eos=True)[0].outputs[0].token_ids) for p in prompts]
        scheduler._preempt_request = counting_preempt
        together = [list(out.outputs[0].token_ids) for out in greedy(engine, prompts, max_tokens=120, ignore_eos=True)]
        assert free_blocks(engine) == start
        # no window was started for an event past the requests' last pass
        assert not model_runner(engine).gkv_state.windows
    finally:
        shutdown(engine)
    assert preempted, "the pool is meant to force preemption"
    assert together == alone


def test_admission_counts_only_what_gkv_requests_hold(smollm2_dir, engine_prompts):
    """Under the admission look-ahead (default horizon), a G-KV request counts as the rows
    it holds between events, not as its whole generation: two run at once in a 20-block
    pool (each needs 17 blocks uncompacted at 120 tokens past its prompt, about 8 between
    events), none is preempted, and each gives the output it gives alone."""
    engine = make_llm(
        smollm2_dir, llm_kwargs("gkv", 64, decode_interval=INTERVAL),
        max_model_len=312, max_num_batched_tokens=64, num_gpu_blocks_override=20,
    )
    try:
        alone, together, preempted, most_running = run_counting_preemptions(
            engine, engine_prompts[:4], admission_horizon=1024, max_tokens=120
        )
    finally:
        shutdown(engine)
    assert not preempted
    assert most_running >= 2
    assert together == alone
