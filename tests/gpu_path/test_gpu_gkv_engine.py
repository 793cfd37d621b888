"""Decode-time eviction (``gkv``, ``judgeq+gkv``, ``streamingllm-decode``) on the GPU engine
path (GPU host only): SmolLM2 bf16 on Model Runner V2 with vLLM's defaults (FA3, FULL decode + PIECEWISE graphs, async
scheduling), the same settings as ``test_gpu_engine.py`` (whose fixtures it uses).

- every event's kept (layer, kv head) rows against the HF reference in bf16 and fp32;
  while the engine's tokens still equal the fp32 reference's, >= 99% of its sets must be
  the fp32 reference's up to bf16 ties (no row swapped further from the cut than HF's own
  bf16 run swaps any); greedy tokens reported; events at the same token counts;
- event steps replay FULL graphs, as decode steps do (the events run after the forward);
- resident blocks bounded by ``cdiv(b + interval, bs) + 2`` after the first event, blocks
  freed per event exactly ``[S_{i-1}/bs, S_i/bs)``, pool back after completion and aborts
  (mid-window, mid-prefill);
- eviction time recorded, no eviction kernel compiled while serving.

Needs JUDGEQ_SMOLLM2_DIR and JUDGEQ_CORPUS; run with VLLM_ENABLE_V1_MULTIPROCESSING=0.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from test_gpu_engine import (  # noqa: F401 (fixtures)
    ARTIFACT,
    BLOCK_SIZE,
    EVICTION_KERNELS,
    SHUT_DOWN,
    SetAgreement,
    engine_core,
    eviction_kernel_compiles,
    free_blocks,
    greedy,
    hf_reference,
    make_llm,
    model_dir,
    prompts,
    shutdown,
)

pytestmark = pytest.mark.gpu

BUDGET, INTERVAL, WINDOW = 112, 32, 16
NEW_TOKENS = 130
# 100 tokens: within the budget, first event while decoding; the others: a prefill event
PROMPT_COUNT = 4
MAX_RESIDENT_BLOCKS = -(-(BUDGET + INTERVAL) // BLOCK_SIZE) + 2
GKV_KERNELS = EVICTION_KERNELS | {"gkv_ring_rows_kernel"}
RESULTS: dict = {}


@pytest.fixture
def gkv_llm(model_dir):
    """Makes G-KV engines and shuts down, when the test ends, any its body did not: a
    failed test must not keep its engine's GPU memory from the next one."""
    from judgeq_vllm.vllm_adapter import llm_kwargs

    made = []

    def make(name, **kwargs):
        soft_tokens = str(ARTIFACT) if name == "judgeq+gkv" else None
        eviction = llm_kwargs(name, BUDGET, soft_tokens=soft_tokens, decode_interval=INTERVAL)
        made.append(make_llm(model_dir, eviction, **kwargs))
        return made[-1]

    yield make
    for llm in made:
        if id(llm) not in SHUT_DOWN:
            shutdown(llm)


def runner_of(llm):
    return engine_core(llm).model_executor.driver_worker.worker.model_runner


def record_event_dispatch(runner) -> dict[str, list[str]]:
    """The CUDA-graph modes of event steps and of all-decode steps without an event."""
    manager = runner.cudagraph_manager
    dispatch = manager.dispatch
    modes = {"event": [], "decode": []}

    def recording_dispatch(num_reqs, num_tokens, uniform_token_count, num_active_loras=0):
        desc = dispatch(num_reqs, num_tokens, uniform_token_count, num_active_loras=num_active_loras)
        if runner._gkv_jobs:
            modes["event"].append(desc.cg_mode.name)
        elif uniform_token_count == 1:
            modes["decode"].append(desc.cg_mode.name)
        return desc

    manager.dispatch = recording_dispatch
    return modes


@pytest.mark.parametrize("name", ["gkv", "judgeq+gkv", "streamingllm-decode"])
def test_events_match_the_reference(name, gkv_llm, prompts, hf_reference):
    from judgeq_vllm.policies import GKVPolicy, StreamingLLMDecodePolicy, make_policy
    from judgeq_vllm.reference import generate_gkv
    from judgeq_vllm.soft_tokens import SoftTokens
    from judgeq_vllm.vllm_adapter.step import GKVEventRecorder

    chosen = prompts[:PROMPT_COUNT]
    llm = gkv_llm(name)
    runner = runner_of(llm)
    recorder = runner.gkv_event_recorder = GKVEventRecorder()
    modes = record_event_dispatch(runner)
    free_at_start = free_blocks(llm)
    with eviction_kernel_compiles() as compiled_while_serving:
        outputs = greedy(llm, chosen, max_tokens=NEW_TOKENS)
    # async scheduling: the last step's blocks come back with its output
    for _ in range(3):
        llm.llm_engine.step()
    free_at_end = free_blocks(llm)
    stats = engine_core(llm).judgeq_stats()
    num_soft = runner.eviction_policy.num_observations if name == "judgeq+gkv" else 0
    shutdown(llm)
    if name == "streamingllm-decode":
        policy = StreamingLLMDecodePolicy(interval=INTERVAL)
    else:
        policy = GKVPolicy(window=WINDOW, interval=INTERVAL)
    prefill = make_policy("judgeq", soft_tokens=SoftTokens.load(ARTIFACT)) if name == "judgeq+gkv" else None
    agreement = {key: SetAgreement() for key in ("engine_vs_hf_bf16", "engine_vs_hf_fp32", "hf_bf16_vs_hf_fp32")}
    while_tokens_agree = {key: SetAgreement() for key in ("engine_vs_hf_fp32", "hf_bf16_vs_hf_fp32")}
    same_tokens, events_compared = 0, 0
    for prompt, output in zip(chosen, outputs):
        references = {
            dtype: generate_gkv(hf_reference[dtype], prompt, policy, BUDGET, NEW_TOKENS, stop_token_ids=[],
                                prefill_policy=prefill)
            for dtype in (torch.bfloat16, torch.float32)
        }
        ref_bf16, ref_fp32 = references[torch.bfloat16], references[torch.float32]
        tokens = list(output.outputs[0].token_ids)
        same_tokens += tokens == ref_bf16.token_ids
        # the first generated token whose pass differs from the fp32 reference's
        diverged_at = next((i for i, (a, b) in enumerate(zip(tokens, ref_fp32.token_ids)) if a != b), len(tokens))
        events = recorder.for_request(output.request_id)
        # soft tokens are appended only to a prompt Judge Q evicts (not to one within the budget)
        soft = num_soft if ref_bf16.prefill_kept is not None else 0
        assert sorted(events) == [e.num_tokens + soft for e in ref_bf16.evictions]
        for eviction_bf16, eviction_fp32 in zip(ref_bf16.evictions, ref_fp32.evictions):
            layers = events[eviction_bf16.num_tokens + soft]
            # the engine's event at T ran over the tokens fed before it: compare while equal
            tokens_agree = eviction_bf16.num_tokens - len(prompt) <= diverged_at
            events_compared += tokens_agree
            for layer, expected in enumerate(eviction_bf16.kept):
                got = layers[layer].cpu()
                assert got.shape == expected.shape
                exact, ranking = eviction_fp32.kept[layer], eviction_fp32.rankings[layer]
                # rows kept whatever they score (G-KV's window) rank at inf
                protected = None if ranking is None else ranking[0].isinf()
                agreement["engine_vs_hf_bf16"].add(layer, got, expected, ranking, protected)
                agreement["engine_vs_hf_fp32"].add(layer, got, exact, ranking, protected)
                agreement["hf_bf16_vs_hf_fp32"].add(layer, expected, exact, ranking, protected)
                if tokens_agree:
                    while_tokens_agree["engine_vs_hf_fp32"].add(layer, got, exact, ranking, protected)
                    while_tokens_agree["hf_bf16_vs_hf_fp32"].add(layer, expected, exact, ranking, protected)
    # the bf16 tie tolerance: how far from the fp32 cut HF's own bf16 run swaps rows
    tie_tolerance = while_tokens_agree["hf_bf16_vs_hf_fp32"].as_dict()["largest_swap_distance"]
    within_ties = while_tokens_agree["engine_vs_hf_fp32"].fraction_within(tie_tolerance)
    RESULTS[name] = {
        **{key: value.as_dict() for key, value in agreement.items()},
        "while_tokens_agree": {key: value.as_dict() for key, value in while_tokens_agree.items()},
        "bf16_tie_tolerance": tie_tolerance,
        "engine_vs_hf_fp32_identical_within_bf16_ties_while_tokens_agree": within_ties,
        "events_compared_while_tokens_agree": events_compared,
        "identical_greedy_outputs_vs_hf_bf16": same_tokens,
        "prompts": len(chosen),
        "event_step_modes": {mode: modes["event"].count(mode) for mode in set(modes["event"])},
        "decode_step_modes": {mode: modes["decode"].count(mode) for mode in set(modes["decode"])},
        "decode_compactions": stats["decode_compactions"],
        "blocks_freed": stats["blocks_freed"],
        "pool_back_to_start": free_at_end == free_at_start,
        "eviction_seconds_histogram": stats["eviction_seconds_histogram"],
        "eviction_kernels_compiled_while_serving": compiled_while_serving,
    }
    print(json.dumps({name: RESULTS[name]}))
    assert free_at_end == free_at_start
    assert "FULL" in modes["event"] and "FULL" in modes["decode"]
    assert stats["eviction_seconds_histogram"]["count"] >= 1
    assert compiled_while_serving == []
    assert events_compared >= 1
    assert within_ties >= 0.99


def add(llm, request_id, prompt, max_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    (engine_id,) = [rid for rid in engine_core(llm).scheduler.requests if rid.rsplit("-", 1)[0] == request_id]
    return engine_id


def block_row(llm, engine_id):
    manager = engine_core(llm).scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    return manager.req_to_blocks.get(engine_id, [])


def drain(llm, extra_steps=3):
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    # async scheduling: the last step's blocks come back with its output
    for _ in range(extra_steps):
        llm.llm_engine.step()


def test_blocks_freed_per_event_and_resident_bounded(gkv_llm, prompts):
    """One long generation stepped by hand: every event frees the blocks below its S_i
    (under async scheduling, once its step's output is processed), the request holds at
    most cdiv(b + interval, bs) + 2 blocks after its first event, the pool comes back."""
    llm = gkv_llm("gkv")
    scheduler = engine_core(llm).scheduler
    start = free_blocks(llm)
    prompt = prompts[2]
    engine_id = add(llm, "long-gkv", prompt, max_tokens=400)
    schedule = scheduler.gkv_schedules[engine_id]
    held_after_first_event, nulls_seen = [], []
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
        request = scheduler.requests.get(engine_id)
        if request is None:
            break
        row = block_row(llm, engine_id)
        nulls = sum(block.is_null for block in row)
        if nulls:
            # the head is null exactly up to some event's S_i / bs, and nothing after it
            assert all(block.is_null for block in row[:nulls])
            nulls_seen.append(nulls)
        if request.num_computed_tokens > schedule.first_event + 1:
            held_after_first_event.append(sum(not block.is_null for block in row))
    drain(llm)
    free_at_end = free_blocks(llm)
    shutdown(llm)
    expected_nulls = {schedule.layout(event).freed_blocks
                      for event in range(schedule.first_event, len(prompt) + 400, INTERVAL)}
    RESULTS["blocks"] = {"max_held_after_first_event": max(held_after_first_event), "bound": MAX_RESIDENT_BLOCKS,
                         "null_heads_seen": sorted(set(nulls_seen)), "pool_back_to_start": free_at_end == start}
    assert max(held_after_first_event) <= MAX_RESIDENT_BLOCKS
    assert set(nulls_seen) <= expected_nulls and len(set(nulls_seen)) >= 6
    assert nulls_seen == sorted(nulls_seen)
    assert free_at_end == start
    assert not scheduler.gkv_schedules and not scheduler.gkv_events_scheduled


def test_aborts_mid_window_and_mid_prefill_leak_nothing(gkv_llm, prompts):
    llm = gkv_llm("gkv")
    scheduler = engine_core(llm).scheduler
    start = free_blocks(llm)
    in_window = add(llm, "abort-window", prompts[2], max_tokens=300)
    schedule = scheduler.gkv_schedules[in_window]
    target = schedule.next_event(schedule.first_event) - WINDOW // 2
    while scheduler.requests[in_window].num_computed_tokens < target:
        llm.llm_engine.step()
    mid_prefill = add(llm, "abort-prefill", prompts[-1], max_tokens=300)
    llm.llm_engine.step()
    assert 0 < scheduler.requests[mid_prefill].num_computed_tokens < len(prompts[-1])
    llm.llm_engine.abort_request(["abort-window", "abort-prefill"])
    keeper = add(llm, "after-abort", prompts[0], max_tokens=2 * INTERVAL)
    drain(llm)
    free_at_end = free_blocks(llm)
    shutdown(llm)
    RESULTS["aborts"] = {"pool_back_to_start": free_at_end == start}
    assert keeper not in scheduler.requests
    assert free_at_end == start
    assert not scheduler.gkv_schedules and not scheduler.gkv_events_scheduled


def teardown_module(module):
    out = os.environ.get("JUDGEQ_GPU_GKV_RESULTS")
    if out:
        Path(out).write_text(json.dumps(RESULTS, indent=2))
