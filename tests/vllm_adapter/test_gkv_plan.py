"""G-KV's event schedule, layouts and per-step work, without an engine; and its settings."""

import pytest

from judgeq_vllm.policies import GKVPolicy, KVBudget, StreamingLLMDecodePolicy, make_policy
from judgeq_vllm.soft_tokens import SoftTokens
from judgeq_vllm.vllm_adapter import llm_kwargs
from judgeq_vllm.vllm_adapter.config import EvictionConfig
from judgeq_vllm.vllm_adapter.decode_plan import EVENT_FREE_LAG, gkv_schedule, split_at_events, step_work
from judgeq_vllm.vllm_adapter.plan import plan_request

BLOCK = 16


def schedule_for(prompt_len, budget, interval=32, window=16, judgeq_soft=0):
    policy = GKVPolicy(window=window, interval=interval)
    prefill = None
    if judgeq_soft:
        import torch

        judgeq = make_policy("judgeq", soft_tokens=SoftTokens(torch.zeros(judgeq_soft, 8), "test", "test"))
        prefill = plan_request(prompt_len, judgeq, KVBudget(tokens=budget), BLOCK, num_layers=4)
    return gkv_schedule(prompt_len, policy, budget, BLOCK, 4, prefill)


def simulated_events(prompt_len, budget, interval, num_soft, prefill_keep, passes):
    """The reference's loop (reference/gkv.py): resident rows after every pass, compress when
    the pass index is a multiple of the interval and the cache exceeds the budget."""
    events = []
    resident = prefill_keep if prefill_keep is not None else prompt_len
    for forward_index in range(passes):
        if forward_index:
            resident += 1
        if prefill_keep is not None and forward_index == 0:
            continue  # the prefill policy's own compaction, not a G-KV event
        if GKVPolicy(window=16, interval=interval).compresses_at(forward_index, resident, budget):
            events.append((prompt_len + num_soft + forward_index, resident))
            resident = budget
    return events


@pytest.mark.parametrize("prompt_len", [40, 100, 111, 112, 113, 140, 700])
@pytest.mark.parametrize("interval", [16, 32, 128])
@pytest.mark.parametrize("judgeq_soft", [0, 8])
def test_events_match_the_reference_loop(prompt_len, interval, judgeq_soft):
    budget, passes = 112, 600
    schedule = schedule_for(prompt_len, budget, interval, judgeq_soft=judgeq_soft)
    num_soft = schedule.num_soft
    prefill_keep = schedule.prefill.keep if schedule.prefill is not None else None
    expected = simulated_events(prompt_len, budget, interval, num_soft, prefill_keep, passes)
    end = prompt_len + num_soft + passes
    events = [t for t in range(end) if schedule.is_event(t)]
    assert events == [t for t, _ in expected]
    previous = None
    for event, resident in expected:
        layout = schedule.layout(event)
        # the one-shot formula sheet at T: delta below a block, the kept rows inside the
        # blocks vLLM has allocated for T tokens, the head only ever growing
        assert layout.total_len == event and layout.keep == budget
        assert 0 <= layout.slot_shift < BLOCK
        assert layout.first_kept_slot + budget <= event
        source = schedule.layout_before(event - 1)
        start = 0 if source is None else source.first_kept_slot
        stop = event - (0 if source is None else source.slot_shift)
        assert stop - start == resident
        assert previous is None or layout.first_kept_slot >= previous.first_kept_slot
        # blocks held right before the next event: at most b + interval rows' worth, plus 2
        held = -(-(event + interval - layout.slot_shift) // BLOCK) - layout.freed_blocks
        assert held <= -(-(budget + interval) // BLOCK) + 2
        previous = layout
    assert schedule.next_event(events[0] - 1) == events[0] if events else True


@pytest.mark.parametrize("prompt_len", [40, 100, 140, 700])
@pytest.mark.parametrize("interval", [16, 32, 128])
@pytest.mark.parametrize("judgeq_soft", [0, 8])
def test_resident_block_cap_is_the_most_a_request_holds_between_events(prompt_len, interval, judgeq_soft):
    """Walk a long generation: at every length from the first event (plus the lag) on, the
    blocks from the latest event whose head blocks are back (one that ran at least
    EVENT_FREE_LAG tokens ago) to the end never exceed the cap, and reach it."""
    schedule = schedule_for(prompt_len, 112, interval=interval, judgeq_soft=judgeq_soft)
    held = []
    for length in range(schedule.first_event + EVENT_FREE_LAG, schedule.first_event + 40 * interval):
        freed_by = schedule.last_event(length - EVENT_FREE_LAG)
        held.append(-(-length // BLOCK) - schedule.layout(freed_by).freed_blocks)
    assert max(held) == schedule.resident_block_cap
    # b + interval rows, the lag, and at most one block of alignment at each end
    assert schedule.resident_block_cap <= -(-(112 + interval + EVENT_FREE_LAG) // BLOCK) + 1


def test_step_work_of_decode_steps_and_a_prefill_chunk():
    schedule = schedule_for(140, 112)  # the prefill compresses: events at 140, 172, ...
    # a chunked prefill: [0, 100) captures nothing, [100, 140) ends at the event
    assert step_work(schedule, 0, 100) == (None, None)
    job, capture = step_work(schedule, 100, 40)
    assert job.event == 140 and job.source is None and not job.has_previous_scores
    assert (job.source_start, job.source_end) == (0, 140)
    assert (capture.first_token, capture.window_offset, capture.count) == (24, 0, 16)
    # decode steps: tokens 156..171 fill the next window, the step ending at 172 runs it
    captured = []
    for computed in range(140, 172):
        job, capture = step_work(schedule, computed, 1)
        if capture is not None:
            captured.append((computed, capture.window_offset))
        assert (job is not None) == (computed == 171)
    assert captured == [(156 + i, i) for i in range(16)]
    job, _ = step_work(schedule, 171, 1)
    assert job.has_previous_scores and job.source == schedule.layout(140)
    assert (job.source_start, job.source_end) == (schedule.layout(140).first_kept_slot, 172 - schedule.layout(140).slot_shift)
    # a re-prefill after preemption is cut at every event
    assert split_at_events(schedule, 0, 500) == 140
    assert split_at_events(schedule, 140, 500) == 32
    assert split_at_events(schedule, 150, 5) == 5


@pytest.mark.parametrize("prompt_len", [100, 140])
def test_a_policy_without_queries_gets_gkvs_events_and_no_captures(prompt_len):
    """streamingllm-decode: the same events, jobs and layouts as G-KV's, no query window to
    capture, and prefix hits capped by the first compaction's S alone."""
    streaming = gkv_schedule(prompt_len, StreamingLLMDecodePolicy(interval=32), 112, BLOCK, 4, None)
    gkv = schedule_for(prompt_len, 112)
    assert streaming.first_event == gkv.first_event
    for computed in range(prompt_len, prompt_len + 200):
        job, capture = step_work(streaming, computed, 1)
        assert capture is None
        gkv_job, _ = step_work(gkv, computed, 1)
        assert (job is None) == (gkv_job is None)
        if job is not None:
            assert (job.event, job.source_start, job.source_end) == (gkv_job.event, gkv_job.source_start, gkv_job.source_end)
            assert job.target.first_kept_slot == gkv_job.target.first_kept_slot and job.target.keep == 112
    assert streaming.prefix_hit_cap() == streaming.first_kept_slot == 16


def test_prefix_caching_caps():
    schedule = schedule_for(140, 112)
    assert schedule.first_kept_slot == schedule.layout(140).first_kept_slot == 16
    assert schedule.prefix_hit_cap() == 16
    within = schedule_for(100, 112)  # first event during decoding, at 132
    assert within.first_event == 132
    assert within.first_kept_slot == 16 and within.prefix_hit_cap() == 16
    judged = schedule_for(300, 112, judgeq_soft=8)
    assert judged.first_kept_slot == min(judged.prefill.first_kept_slot, judged.layout(judged.first_event).first_kept_slot)
    assert judged.prefix_hit_cap() <= judged.prefill.prefix_hit_cap


def test_settings_of_the_decode_policies():
    config = EvictionConfig.from_additional_config(llm_kwargs("gkv", 256, decode_interval=64, window=8)["additional_config"])
    assert config.decodes and config.prefill_policy is None and config.build_policy() is None
    decode = config.build_decode_policy()
    assert (decode.window, decode.interval) == (8, 64)
    assert config.to_additional_config()["kv_decode_interval"] == 64
    both = EvictionConfig.from_additional_config(llm_kwargs("judgeq+gkv", 256, soft_tokens="x")["additional_config"])
    assert both.prefill_policy == "judgeq" and both.build_decode_policy().interval == 128
    assert EvictionConfig.from_additional_config(llm_kwargs("snapkv", 256)["additional_config"]).build_decode_policy() is None
    streaming = EvictionConfig.from_additional_config(
        llm_kwargs("streamingllm-decode", 256, decode_interval=64, sinks=2)["additional_config"]
    )
    assert streaming.decodes and streaming.prefill_policy is None and streaming.build_policy() is None
    assert streaming.build_decode_policy() == StreamingLLMDecodePolicy(sinks=2, interval=64)
    default = EvictionConfig.from_additional_config(llm_kwargs("streamingllm-decode", 256)["additional_config"])
    assert default.build_decode_policy() == StreamingLLMDecodePolicy(sinks=4, interval=128)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kv_budget": 0.5}, "needs a token budget"),
        ({"kv_budget": 16}, "must exceed the window"),
        ({"kv_budget": 256, "decode_interval": 0}, "--kv-decode-interval"),
        ({"kv_budget": 256, "decode_interval": 8}, "interval=8 must be >= window"),
        ({"kv_budget": 256, "pool_kernel": 3}, "no parameter pool_kernel"),
    ],
)
def test_bad_decode_settings_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvictionConfig.from_additional_config(llm_kwargs("gkv", **kwargs)["additional_config"])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kv_budget": 0.5}, "streamingllm-decode needs a token budget"),
        ({"kv_budget": 4}, r"the budget \(4 tokens\) must exceed the sinks \(4\)"),
        ({"kv_budget": 256, "sinks": -1}, "sinks=-1 must be >= 0"),
        ({"kv_budget": 256, "decode_interval": 0}, "--kv-decode-interval"),
        ({"kv_budget": 256, "window": 16}, "'streamingllm-decode' has no parameter window; its parameters are: sinks"),
    ],
)
def test_bad_streaming_decode_settings_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvictionConfig.from_additional_config(llm_kwargs("streamingllm-decode", **kwargs)["additional_config"])


def test_unknown_policy_lists_the_decode_policies():
    with pytest.raises(ValueError, match="choose one of: none, gkv, .*, streamingllm, streamingllm-decode$"):
        EvictionConfig.from_additional_config(llm_kwargs("gkvv", 256)["additional_config"])


def test_cli_flags_reach_the_config(smollm2_dir):
    from test_config import parse_cli

    args = parse_cli(["--model", smollm2_dir, "--kv-eviction", "judgeq+gkv", "--kv-budget", "256",
                      "--judgeq-soft-tokens", "x.safetensors", "--kv-decode-interval", "64"])
    config = EvictionConfig.from_additional_config(args.additional_config)
    assert config.policy == "judgeq+gkv" and config.decode_interval == 64 and config.soft_tokens == "x.safetensors"
    args = parse_cli(["--model", smollm2_dir, "--kv-eviction", "streamingllm-decode", "--kv-budget", "256",
                      "--kv-sinks", "8", "--kv-decode-interval", "32"])
    config = EvictionConfig.from_additional_config(args.additional_config)
    assert config.build_decode_policy() == StreamingLLMDecodePolicy(sinks=8, interval=32)
