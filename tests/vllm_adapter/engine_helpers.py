"""Engine helpers shared by the engine tests (in-process vLLM, fp32, block size 16)."""

import gc
from dataclasses import replace

import torch

# 16 prompts, 100..3000 tokens, most short: prefill cost dominates the suite's run time
ENGINE_PROMPT_LENS = [100, 108, 117, 128, 140, 155, 170, 190, 215, 245, 290, 350, 450, 650, 1100, 3000]
MAX_NEW_TOKENS = 8
BLOCK_SIZE = 16
N_SOFT = 32


def make_llm(model_dir, eviction=None, **kwargs):
    """An in-process fp32 engine; ``eviction`` is ``llm_kwargs(...)`` or ``None`` (vanilla)."""
    from vllm import LLM

    settings = dict(
        model=model_dir, dtype="float32", enforce_eager=True, block_size=BLOCK_SIZE, seed=0,
        max_model_len=max(ENGINE_PROMPT_LENS) + N_SOFT + MAX_NEW_TOKENS + 16,
        max_num_seqs=16, max_num_batched_tokens=512, kv_cache_memory_bytes=512 * 2**20,
    )
    settings.update(kwargs)
    return LLM(**settings, **(eviction or {}))


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def engine_core(llm):
    return llm.llm_engine.engine_core.engine_core


def model_runner(llm):
    return engine_core(llm).model_executor.driver_worker.worker.model_runner


def free_blocks(llm) -> int:
    return engine_core(llm).scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def greedy(llm, prompts, max_tokens=MAX_NEW_TOKENS, **sampling):
    """Greedy outputs of one batched generate call, in prompt order."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),
        use_tqdm=False,
    )
    return outputs


def greedy_recording_events(llm, prompts, max_tokens):
    """Greedy outputs (no EOS stop) with every decode-time event's kept rows recorded by
    the model runner; checks that the pool is whole again afterwards."""
    from judgeq_vllm.vllm_adapter.step import GKVEventRecorder

    runner = model_runner(llm)
    recorder = runner.gkv_event_recorder = GKVEventRecorder()
    start = free_blocks(llm)
    try:
        outputs = greedy(llm, prompts, max_tokens=max_tokens, ignore_eos=True)
    finally:
        runner.gkv_event_recorder = None
    assert free_blocks(llm) == start
    return outputs, recorder


def add(llm, request_id, prompt, max_tokens):
    """Adds a greedy request (no EOS stop) without stepping; returns its id inside the engine."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    (engine_id,) = [rid for rid in engine_core(llm).scheduler.requests if rid.rsplit("-", 1)[0] == request_id]
    return engine_id


def abort_mid_prefill_and_mid_decode(llm, prefill_prompt, decode_prompt) -> None:
    """Aborts a request after its first prefill chunk and another one after its compaction,
    three tokens into its decode; then runs the engine dry."""
    scheduler = engine_core(llm).scheduler
    mid_prefill = add(llm, "abort-prefill", prefill_prompt, max_tokens=50)
    mid_decode = add(llm, "abort-decode", decode_prompt, max_tokens=50)
    llm.llm_engine.step()
    assert 0 < scheduler.requests[mid_prefill].num_computed_tokens < len(prefill_prompt)
    llm.llm_engine.abort_request(["abort-prefill"])
    while scheduler.requests[mid_decode].num_output_tokens < 3:
        llm.llm_engine.step()
    assert block_row(llm, mid_decode)[0].is_null  # compacted, head freed
    llm.llm_engine.abort_request(["abort-decode"])
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()


def block_row(llm, engine_id):
    """The request's block table (null blocks where compaction freed the head)."""
    manager = engine_core(llm).scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    return manager.req_to_blocks.get(engine_id, [])


def step_checking_event_blocks(llm, engine_id, schedule, max_resident_blocks):
    """Steps the engine until request ``engine_id`` (alone in it) ends, checking after every
    step that a step that freed blocks freed exactly the head blocks below the first kept
    slot of the event it ran, and that from its first event on the request never holds more
    than ``max_resident_blocks``. Returns the computed-token counts at which blocks were freed."""
    scheduler = engine_core(llm).scheduler
    freed_at = []
    while llm.llm_engine.has_unfinished_requests():
        computed_before = scheduler.requests[engine_id].num_computed_tokens
        row_before = list(block_row(llm, engine_id))
        free_before = free_blocks(llm)
        llm.llm_engine.step()
        request = scheduler.requests.get(engine_id)
        if request is None:
            break
        row = block_row(llm, engine_id)
        allocated = len(row) - len(row_before)
        freed = free_blocks(llm) - (free_before - allocated)
        computed = request.num_computed_tokens
        held = sum(not block.is_null for block in row)
        if freed:
            freed_at.append(computed)
            layout = schedule.layout(computed)
            assert all(block.is_null for block in row[: layout.freed_blocks])
            assert not any(block.is_null for block in row[layout.freed_blocks :])
            assert freed == layout.freed_blocks - sum(block.is_null for block in row_before)
        if computed >= schedule.first_event:
            assert held <= max_resident_blocks, f"{held} blocks held at {computed} tokens"
        assert computed_before < computed
    return freed_at


def run_counting_preemptions(llm, prompts, admission_horizon, max_tokens=80):
    """Greedy outputs of ``prompts`` alone, then together (``max_tokens`` each), under an
    admission look-ahead of ``admission_horizon`` decode steps: the outputs, the
    preemptions of the together run, and the most requests running at once."""
    scheduler = engine_core(llm).scheduler
    config = scheduler.eviction_config
    preempt, schedule = scheduler._preempt_request, scheduler.schedule
    preempted, running = [], []

    def counting_preempt(request, timestamp):
        preempted.append(request.request_id)
        preempt(request, timestamp)

    def counting_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        running.append(len(scheduler.running))
        return output

    scheduler._preempt_request, scheduler.schedule = counting_preempt, counting_schedule
    scheduler.eviction_config = replace(config, admission_horizon=admission_horizon)
    try:
        start = free_blocks(llm)
        alone = [list(greedy(llm, [p], max_tokens=max_tokens, ignore_eos=True)[0].outputs[0].token_ids) for p in prompts]
        assert not preempted, "one request at a time must fit the pool"
        running.clear()
        together = [list(out.outputs[0].token_ids) for out in greedy(llm, prompts, max_tokens=max_tokens, ignore_eos=True)]
    finally:
        del scheduler._preempt_request, scheduler.schedule
        scheduler.eviction_config = config
    assert free_blocks(llm) == start
    return alone, together, preempted, max(running)


# ---- every rank's records (tensor parallelism: the workers are other processes) ----------
# these run on each worker through ``LLM.collective_rpc``, which pickles them by reference:
# they live here, in a module the workers can import, not in a test module


def attach_recorder(worker, attribute: str) -> None:
    """Gives the worker's runner a fresh recorder: ``kept_index_recorder`` (prefill
    compactions) or ``gkv_event_recorder`` (decode-time events)."""
    from judgeq_vllm.vllm_adapter.step import GKVEventRecorder, KeptIndexRecorder

    recorders = {"kept_index_recorder": KeptIndexRecorder, "gkv_event_recorder": GKVEventRecorder}
    setattr(worker.model_runner, attribute, recorders[attribute]())


def take_recorder(worker, attribute: str):
    """The runner's recorder, detached."""
    recorder = getattr(worker.model_runner, attribute)
    setattr(worker.model_runner, attribute, None)
    return recorder


def merged_kept(recorders, request_id: str) -> dict[int, torch.Tensor] | None:
    """One request's kept rows per layer over every rank's kv heads, in rank order (rank
    ``r`` holds the ``r``-th contiguous share of the heads)."""
    per_rank = [recorder.for_request(request_id) for recorder in recorders]
    if all(kept is None for kept in per_rank):
        return None
    assert all(kept is not None for kept in per_rank), f"{request_id}: compacted on some ranks only"
    return join_heads(per_rank)


def merged_events(recorders, request_id: str) -> dict[int, dict[int, torch.Tensor]]:
    """One request's decode-time events (``GKVEventRecorder``) over every rank's kv heads."""
    per_rank = [recorder.for_request(request_id) for recorder in recorders]
    assert all(sorted(events) == sorted(per_rank[0]) for events in per_rank), f"{request_id}: ranks' events differ"
    return {event: join_heads([events[event] for events in per_rank]) for event in per_rank[0]}


def join_heads(per_rank: list[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """``layer -> [heads, k]`` records of every rank joined along the heads, in rank order."""
    return {layer: torch.cat([kept[layer] for kept in per_rank]) for layer in per_rank[0]}
