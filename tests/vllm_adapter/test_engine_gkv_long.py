"""G-KV at its default interval over a 4,000-token generation: resident KV stays bounded.

One engine (``gkv``, budget 256, the default ``--kv-decode-interval`` 128, window 16,
bf16, block size 16), in-process, one 290-token prompt (compressed at the prefill, then
at every 128th pass). The step loop reads the request's block row and the free pool
after every engine step.

The bound. After the event at ``T_i`` the request holds ``b`` rows at logical slots
``[S_i, S_i + b)`` (``S_i`` block aligned, ``delta_i = T_i - S_i - b < bs``), and each
pass appends one; the next event runs in the pass that brings ``interval`` more tokens,
so the exact resident count is ``b + (computed - T_i) <= b + interval`` (``b + interval``
only inside the event's own forward, before its compaction). vLLM allocates blocks for
logical positions up to ``computed``, from ``S_i`` on, so the blocks held are
``cdiv(resident + delta_i, bs) <= cdiv(b + interval + bs - 1, bs)``.
"""

import pytest
from dataclasses import dataclass

from engine_helpers import BLOCK_SIZE, N_SOFT, add, block_row, engine_core, free_blocks, make_llm, model_runner, shutdown

from judgeq_vllm.vllm_adapter import llm_kwargs

BUDGET = 256
INTERVAL = 128  # the default --kv-decode-interval: the engine is started without one
PROMPT_INDEX = 10  # 290 tokens: more than the budget, so the prefill compresses too
NEW_TOKENS = 4000
MAX_RESIDENT_ROWS = BUDGET + INTERVAL
MAX_HELD_BLOCKS = -(-(BUDGET + INTERVAL + BLOCK_SIZE - 1) // BLOCK_SIZE)


@pytest.fixture(scope="module")
def llm(smollm2_dir, engine_prompts):
    llm = make_llm(
        smollm2_dir, llm_kwargs("gkv", BUDGET), dtype="bfloat16",
        max_model_len=len(engine_prompts[PROMPT_INDEX]) + NEW_TOKENS + N_SOFT,
    )
    yield llm
    shutdown(llm)


@dataclass(frozen=True)
class Step:
    """One engine step seen from one request."""

    computed: int  # tokens computed after the step
    held: int  # blocks the request holds (not null)
    freed: int  # blocks its compaction returned (free count change plus its own new blocks)
    free_before: int
    free_after: int


def step_until(llm, engine_id, done) -> list[Step]:
    """Engine steps until ``done(request)`` or the request ends (the step that samples its
    last token frees it and is not recorded)."""
    scheduler = engine_core(llm).scheduler
    steps = []
    while llm.llm_engine.has_unfinished_requests():
        free_before, row_before = free_blocks(llm), len(block_row(llm, engine_id))
        llm.llm_engine.step()
        request = scheduler.requests.get(engine_id)
        if request is None:
            break
        row = block_row(llm, engine_id)
        free_after = free_blocks(llm)
        held = sum(not block.is_null for block in row)
        freed = free_after - free_before + len(row) - row_before
        steps.append(Step(request.num_computed_tokens, held, freed, free_before, free_after))
        if done(request):
            break
    return steps


def test_resident_kv_stays_within_budget_plus_interval_over_4000_tokens(llm, engine_prompts):
    prompt = engine_prompts[PROMPT_INDEX]
    scheduler = engine_core(llm).scheduler
    start = free_blocks(llm)
    engine_id = add(llm, "long-default-interval", prompt, max_tokens=NEW_TOKENS)
    schedule = scheduler.gkv_schedules[engine_id]
    assert schedule.interval == INTERVAL and schedule.first_event == len(prompt)
    steps = step_until(llm, engine_id, lambda request: False)
    assert steps[-1].computed == len(prompt) + NEW_TOKENS - 2
    events = []
    max_resident = 0
    freed_before_event = 0
    for step in steps:
        event = schedule.last_event(step.computed)
        layout = schedule.layout(event)
        resident = BUDGET + step.computed - event
        max_resident = max(max_resident, resident)
        assert resident <= MAX_RESIDENT_ROWS, f"{resident} rows resident at {step.computed} tokens"
        # the block pool agrees: blocks from S_i up to the logical end, nothing more
        assert step.held == -(-(resident + layout.slot_shift) // BLOCK_SIZE) <= MAX_HELD_BLOCKS, step
        if schedule.is_event(step.computed):
            events.append(step.computed)
            # exactly the blocks below the new first kept slot that were still held
            assert step.freed == layout.freed_blocks - freed_before_event, step
            freed_before_event = layout.freed_blocks
            if step.computed > len(prompt):
                assert step.free_after > step.free_before, f"the pool's free count fell at the event {step}"
        else:
            assert step.freed == 0, step
    assert events == list(range(len(prompt), len(prompt) + NEW_TOKENS - 1, INTERVAL))
    # the step before each event holds b + interval - 1 rows: the bound is tight
    assert max_resident == MAX_RESIDENT_ROWS - 1
    assert free_blocks(llm) == start
    assert not scheduler.gkv_schedules and not scheduler.gkv_events_scheduled
    assert not model_runner(llm).gkv_state.windows


def test_abort_after_many_events_leaks_nothing(llm, engine_prompts):
    prompt = engine_prompts[PROMPT_INDEX]
    scheduler = engine_core(llm).scheduler
    start = free_blocks(llm)
    engine_id = add(llm, "long-abort", prompt, max_tokens=NEW_TOKENS)
    schedule = scheduler.gkv_schedules[engine_id]
    # stop inside the window of the sixth decode event: its queries are partly captured
    target = schedule.first_event + 6 * INTERVAL - 8
    steps = step_until(llm, engine_id, lambda request: request.num_computed_tokens >= target)
    assert steps[-1].computed == target and engine_id in model_runner(llm).gkv_state.windows
    llm.llm_engine.abort_request(["long-abort"])
    # the next step that runs the model drops the aborted request's window
    keeper = add(llm, "after-long-abort", engine_prompts[0], max_tokens=2)
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    assert keeper not in scheduler.requests
    assert free_blocks(llm) == start
    assert not scheduler.gkv_schedules and not scheduler.gkv_events_scheduled
    assert not model_runner(llm).gkv_state.windows
