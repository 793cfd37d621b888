"""The GPU path's decode-time pieces on CPU (Triton interpreter): the ring-row kernel against
its loop reference, the batched selection against ``GKVPolicy.compress``, and event steps
(G-KV: scoring, compaction, global scores; streamingllm-decode: sinks and recent rows,
compaction; plan rows) against a gather-based reference."""

import pytest
import torch

from judgeq_vllm.policies import GKVPolicy, StreamingLLMDecodePolicy
from judgeq_vllm.vllm_adapter.decode_plan import GKVSchedule, step_work
from judgeq_vllm.vllm_adapter.gpu.gkv_scoring import select_gkv
from judgeq_vllm.vllm_adapter.gpu.gkv_window import NO_SCHEDULE, apply_gkv_ring_rows, reference_gkv_ring_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WINDOW, INTERVAL, BLOCK_SIZE = 4, 8, 16


def ring_batch(rows, num_tokens_padded, max_num_reqs=6):
    """rows: (slot, first event or None, num_computed, num_scheduled) per batch row."""
    first_events = torch.full((max_num_reqs,), NO_SCHEDULE, dtype=torch.int32)
    idx_mapping, qsl, positions = [], [0], []
    for slot, first, computed, scheduled in rows:
        if first is not None:
            first_events[slot] = first
        idx_mapping.append(slot)
        qsl.append(qsl[-1] + scheduled)
        positions.extend(range(computed, computed + scheduled))
    num_tokens = len(positions)
    positions += [0] * (num_tokens_padded - num_tokens)
    tensors = dict(
        idx_mapping=torch.tensor(idx_mapping, dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        positions=torch.tensor(positions, dtype=torch.int64),
        first_events=first_events,
    )
    sizes = dict(num_reqs=len(rows), num_tokens=num_tokens, num_tokens_padded=num_tokens_padded,
                 interval=INTERVAL, window=WINDOW)
    return tensors, sizes


@pytest.mark.parametrize("padded", [0, 5])
def test_ring_rows_match_the_reference(padded):
    rows = [
        (3, 20, 10, 12),  # prefill chunk [10, 22): the first event's window [16, 20), then [24, 28) starts after
        (0, 20, 25, 1),  # decode at 25: window of the event at 28, offset 1
        (5, None, 30, 1),  # no schedule
        (1, 12, 40, 1),  # decode at 40: the event at 44 is past its window start? 40 = 44 - 4: offset 0
        (2, 12, 38, 1),  # 38: next event 44, window starts at 40: not captured
    ]
    tensors, sizes = ring_batch(rows, num_tokens_padded=16 + padded)
    got = torch.full((sizes["num_tokens_padded"] + 3,), -7, dtype=torch.int64)
    want = got.clone()
    on_device = got.to(DEVICE)
    apply_gkv_ring_rows(**{k: v.to(DEVICE) for k, v in tensors.items()}, ring_rows=on_device, **sizes)
    reference_gkv_ring_rows(**tensors, ring_rows=want, **sizes)
    got = on_device.cpu()
    assert torch.equal(got, want)
    spare = 6 * WINDOW
    # chunk [10, 22) of slot 3: positions 16..19 are rows 12..15; the rest spare
    assert want[:12].tolist() == [spare] * 6 + [12, 13, 14, 15] + [spare] * 2
    assert want[12:16].tolist() == [0 * WINDOW + 1, spare, 1 * WINDOW + 0, spare]
    assert want[16 : 16 + padded].tolist() == [spare] * padded
    assert want[16 + padded :].tolist() == [-7] * 3


def test_ring_rows_follow_the_scheduler_captures():
    """Every token the scheduler tags as a window row (decode_plan.step_work) gets that
    row's ring index, and no other token is captured."""
    for prompt_len, budget in ((40, 24), (10, 24), (5, 12)):
        schedule = GKVSchedule(prompt_len, 0, budget, WINDOW, INTERVAL, BLOCK_SIZE, num_layers=1)
        for computed in range(0, prompt_len + 5 * INTERVAL):
            scheduled = 1 if computed >= prompt_len else min(3, schedule.next_event(computed) - computed)
            tensors, sizes = ring_batch([(2, schedule.first_event, computed, scheduled)], num_tokens_padded=scheduled)
            rows = torch.empty(scheduled, dtype=torch.int64)
            reference_gkv_ring_rows(**tensors, ring_rows=rows, **sizes)
            _, capture = step_work(schedule, computed, scheduled)
            expected = [6 * WINDOW] * scheduled
            if capture is not None:
                for i in range(capture.count):
                    expected[capture.first_token + i] = 2 * WINDOW + capture.window_offset + i
            assert rows.tolist() == expected, (prompt_len, budget, computed)


def test_batched_selection_matches_the_policy():
    policy = GKVPolicy(window=WINDOW, interval=INTERVAL)
    gen = torch.Generator().manual_seed(0)
    budget, num_kv_heads, num_q_heads, head_dim = 10, 2, 6, 8
    num_rows = [18, 13, 11]
    max_rows = max(num_rows) + 2
    keys = torch.randn(len(num_rows), num_kv_heads, max_rows, head_dim, generator=gen)
    # some near-duplicate keys, so the redundancy rule has rows above the threshold
    keys[:, :, 5] = keys[:, :, 3] + 0.05 * torch.randn(len(num_rows), num_kv_heads, head_dim, generator=gen)
    queries = torch.randn(len(num_rows), WINDOW, num_q_heads, head_dim, generator=gen)
    previous = torch.rand(len(num_rows), num_kv_heads, budget - WINDOW, generator=gen)
    has_previous = torch.tensor([True, False, True])
    scale = head_dim**-0.5
    got = select_gkv(policy, queries.to(DEVICE), keys.to(DEVICE), torch.tensor(num_rows, device=DEVICE),
                     previous.to(DEVICE), has_previous.to(DEVICE), scale, budget)
    for j, rows in enumerate(num_rows):
        expected = policy.compress(queries[j], keys[j, :, :rows], scale, budget, previous[j] if has_previous[j] else None)
        assert torch.equal(got.kept[j].cpu(), expected.kept), j
        torch.testing.assert_close(got.global_scores[j].cpu(), expected.global_scores)


def fake_cache(num_blocks, num_kv_heads, head_dim, gen):
    """A paged cache in the GPU layout [num_blocks, H, bs, 2 * D] (strides as FA's NHD)."""
    storage = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, 2 * head_dim, generator=gen)
    return storage.to(DEVICE).permute(0, 2, 1, 3)


def write_decoded_rows(caches, block_row, start, end, gen):
    """Fresh K|V at logical rows [start, end): the tokens decoded since the last event.
    Without them those rows would still hold the rows the last compaction copied down, and
    a key present twice ties exactly with its copy, so which one top-k keeps would depend
    on the device."""
    assert start < end, "an event after the first always has rows decoded since the last one"
    rows = torch.arange(start, end)
    blocks, offsets = block_row[rows // BLOCK_SIZE].long(), rows % BLOCK_SIZE
    for cache in caches:
        fresh = torch.randn(len(rows), cache.shape[1], cache.shape[3], generator=gen)
        cache[blocks.to(cache.device), :, offsets.to(cache.device)] = fresh.to(cache.device)


def by_slot(cache):
    """[num_slots, H, 2 * D] on the host: a paged cache's rows by physical slot."""
    return cache.cpu().permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])


def physical(block_row, logical):
    """Physical slots of a request's logical slots, through its block-table row."""
    return block_row[logical // BLOCK_SIZE].long() * BLOCK_SIZE + logical % BLOCK_SIZE


def jobs_at(schedules, event_index):
    """Each request's job for its ``event_index``-th event (the step that ends at it)."""
    return {name: step_work(s, s.first_event + event_index * INTERVAL - 1, 1)[0] for name, s in schedules.items()}


@pytest.mark.parametrize("num_layers, num_events, per_batch", [(32, 7, 56), (32, 7, 5), (3, 5, 2), (4, 1, 1), (5, 3, 1000)])
def test_event_batches_cover_every_pair_once_within_the_bound(num_layers, num_events, per_batch):
    from judgeq_vllm.vllm_adapter.gpu.gkv_events import event_batches

    seen = []
    for layers, events in event_batches(num_layers, num_events, per_batch):
        pairs = [(layer, event) for layer in range(num_layers)[layers] for event in range(num_events)[events]]
        assert 0 < len(pairs) <= max(per_batch, 1)
        seen += pairs
    assert sorted(seen) == [(layer, event) for layer in range(num_layers) for event in range(num_events)]


# per_batch: pairs per select_gkv batch (None: the memory bound's, here every layer at once)
@pytest.mark.parametrize("per_batch", [None, 2, 1])
def test_event_steps_match_the_policy_and_carry_global_scores(per_batch, monkeypatch):
    """Two requests through their events: each event's kept rows (scored with the ring's
    windows and the previous F) equal GKVPolicy.compress on the rows gathered by hand, the
    K|V rows land at [S_i, S_i + b) and F at the first b - w of them; the same whether a
    batch holds every layer's events, one layer's, or one event."""
    from judgeq_vllm.vllm_adapter.gpu import gkv_events
    from judgeq_vllm.vllm_adapter.gpu.gkv_events import GKVEventStep, GKVScores, build_event_jobs
    from judgeq_vllm.vllm_adapter.gpu.gkv_window import GKVQueryRing
    from judgeq_vllm.vllm_adapter.step import GKVEventRecorder

    if per_batch is not None:
        monkeypatch.setattr(gkv_events, "pairs_per_chunk", lambda *shape: per_batch)

    gen = torch.Generator().manual_seed(1)
    policy = GKVPolicy(window=WINDOW, interval=INTERVAL)
    budget, num_layers, num_kv_heads, num_q_heads, head_dim, max_blocks = 20, 3, 2, 4, 8, 8
    caches = [fake_cache(40, num_kv_heads, head_dim, gen) for _ in range(num_layers)]
    scores = GKVScores(num_layers, 40 * BLOCK_SIZE, num_kv_heads, torch.device(DEVICE))
    ring = GKVQueryRing.__new__(GKVQueryRing)  # the ring's buffers without vLLM's staged writes
    ring.window, ring.interval = WINDOW, INTERVAL
    ring.queries = torch.randn(num_layers, 4 * WINDOW + 1, num_q_heads, head_dim, generator=gen).to(DEVICE)
    schedules = {"a": GKVSchedule(30, 0, budget, WINDOW, INTERVAL, BLOCK_SIZE, num_layers),
                 "b": GKVSchedule(9, 0, budget, WINDOW, INTERVAL, BLOCK_SIZE, num_layers)}
    slots = {"a": 1, "b": 3}
    # the two requests' blocks are disjoint
    block_rows = torch.randperm(40, generator=gen)[: 2 * max_blocks].view(2, max_blocks).int()
    scores_of = scores.scores  # [L, slots, H] on DEVICE
    previous = {name: None for name in schedules}
    for event_index in range(3):
        jobs = jobs_at(schedules, event_index)
        if event_index:
            for j, job in enumerate(jobs.values()):
                write_decoded_rows(caches, block_rows[j], job.source_start + budget, job.source_end, gen)
        before = [c.clone().cpu() for c in caches]
        recorder = GKVEventRecorder()
        event_jobs = build_event_jobs(jobs, [slots[n] for n in jobs], block_rows.to(DEVICE), torch.device(DEVICE))
        GKVEventStep(event_jobs, policy, recorder).run(caches, ring, scores, head_dim**-0.5, timed=False)
        for j, (name, job) in enumerate(jobs.items()):
            assert job.has_previous_scores == (previous[name] is not None)
            source = physical(block_rows[j], torch.arange(job.source_start, job.source_end))
            dest_physical = physical(block_rows[j], job.target.first_kept_slot + torch.arange(budget))
            for layer in range(num_layers):
                flat_before, flat_after = by_slot(before[layer]), by_slot(caches[layer])
                keys = flat_before[source, :, :head_dim].transpose(0, 1)
                window = ring.queries[layer, slots[name] * WINDOW : (slots[name] + 1) * WINDOW].cpu()
                prev = previous[name][layer] if previous[name] is not None else None
                expected = policy.compress(window, keys, head_dim**-0.5, budget, prev)
                got = recorder.kept[name][job.event][layer]
                assert torch.equal(got, expected.kept), (name, event_index, layer)
                for head in range(num_kv_heads):
                    assert torch.equal(flat_after[dest_physical, head], flat_before[source[got[head]], head])
                torch.testing.assert_close(
                    scores_of[layer].cpu()[dest_physical[: budget - WINDOW]].T, expected.global_scores
                )
            previous[name] = [
                scores_of[layer].cpu()[dest_physical[: budget - WINDOW]].T for layer in range(num_layers)
            ]


def test_streaming_event_steps_keep_the_sinks_and_the_recent_rows():
    """streamingllm-decode on the G-KV event path, without a ring or scores: every event
    keeps, in every layer and head, the sinks and the last b - sinks resident rows (what
    StreamingLLMDecodePolicy.compress keeps on CPU), and its K|V rows land at [S_i, S_i + b)."""
    from judgeq_vllm.vllm_adapter.gpu.gkv_events import GKVEventStep, build_event_jobs
    from judgeq_vllm.vllm_adapter.step import GKVEventRecorder

    gen = torch.Generator().manual_seed(2)
    sinks, budget, num_layers, num_kv_heads, head_dim, max_blocks = 3, 20, 2, 2, 8, 8
    policy = StreamingLLMDecodePolicy(sinks=sinks, interval=INTERVAL)
    caches = [fake_cache(40, num_kv_heads, head_dim, gen) for _ in range(num_layers)]
    schedules = {"a": GKVSchedule(30, 0, budget, policy.window, INTERVAL, BLOCK_SIZE, num_layers),
                 "b": GKVSchedule(9, 0, budget, policy.window, INTERVAL, BLOCK_SIZE, num_layers)}
    block_rows = torch.randperm(40, generator=gen)[: 2 * max_blocks].view(2, max_blocks).int()
    for event_index in range(3):
        jobs = jobs_at(schedules, event_index)
        before = [c.clone().cpu() for c in caches]
        recorder = GKVEventRecorder()
        step_jobs = build_event_jobs(jobs, [1, 3], block_rows.to(DEVICE), torch.device(DEVICE))
        GKVEventStep(step_jobs, policy, recorder).run(caches, None, None, head_dim**-0.5, timed=False)
        for j, (name, job) in enumerate(jobs.items()):
            num_rows = job.source_end - job.source_start
            expected = torch.cat([torch.arange(sinks), torch.arange(num_rows - budget + sinks, num_rows)])
            source = physical(block_rows[j], torch.arange(job.source_start, job.source_end))
            dest = physical(block_rows[j], job.target.first_kept_slot + torch.arange(budget))
            for layer in range(num_layers):
                flat_before, flat_after = by_slot(before[layer]), by_slot(caches[layer])
                got = recorder.kept[name][job.event][layer]
                assert torch.equal(got, expected.expand(num_kv_heads, -1)), (name, event_index, layer)
                keys = flat_before[source, :, :head_dim].transpose(0, 1)
                assert torch.equal(got, policy.compress(None, keys, 1.0, budget, None).kept)
                # K and V of every head move together
                assert torch.equal(flat_after[dest], flat_before[source[expected]])


@pytest.mark.parametrize("prompt_len", [30, 9])
def test_plan_rows_written_after_each_event_keep_offsets_right(prompt_len):
    """The runner writes each event's layout into plan_state after the event's forward;
    with the offsets kernel's position-conditioned rules, every later token goes right
    after the b kept rows and attention reads exactly the resident rows, event after event."""
    from judgeq_vllm.vllm_adapter.gpu.offsets import NO_PLAN, apply_eviction_offsets, plan_state_row

    budget = 20
    schedule = GKVSchedule(prompt_len, 0, budget, WINDOW, INTERVAL, BLOCK_SIZE, num_layers=1)
    block_table = torch.arange(3, 3 + 16, dtype=torch.int32)[None].repeat(2, 1)
    row = [NO_PLAN, 0, 0, 0, 0]
    layout = None  # the layout tokens are in
    for computed in range(prompt_len, schedule.first_event + 4 * INTERVAL):
        plan_state = torch.tensor([row, row], dtype=torch.int32)
        tensors = dict(
            idx_mapping=torch.tensor([1], dtype=torch.int32),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
            seq_lens=torch.tensor([computed + 1], dtype=torch.int32),
            positions=torch.tensor([computed], dtype=torch.int64),
            plan_state=plan_state,
            block_table=block_table,
            input_block_table=torch.zeros(2, 16, dtype=torch.int32),
            slot_mapping=torch.tensor([(3 + computed // BLOCK_SIZE) * BLOCK_SIZE + computed % BLOCK_SIZE]),
            logits_indices=torch.zeros(1, dtype=torch.int64),
            attn_seq_lens=torch.zeros(2, dtype=torch.int32),
            rope_positions=torch.zeros(1, dtype=torch.int64),
        )
        tensors = {k: v.to(DEVICE) for k, v in tensors.items()}
        apply_eviction_offsets(**tensors, num_reqs=1, num_reqs_padded=1, num_tokens=1, num_tokens_padded=1,
                               block_size=BLOCK_SIZE)
        start = 0 if layout is None else layout.first_kept_slot
        resident_before = computed - (0 if layout is None else layout.slot_shift) - start
        logical = start + resident_before  # the token goes right after the resident rows
        assert int(tensors["slot_mapping"][0]) == (3 + logical // BLOCK_SIZE) * BLOCK_SIZE + logical % BLOCK_SIZE
        assert int(tensors["attn_seq_lens"][0]) == resident_before + 1
        assert int(tensors["rope_positions"][0]) == computed
        if layout is not None:
            shift = layout.freed_blocks
            num_blocks = -(-(resident_before + 1) // BLOCK_SIZE)
            assert torch.equal(tensors["input_block_table"][0, :num_blocks].cpu(), block_table[1, shift : shift + num_blocks])
        job, _ = step_work(schedule, computed, 1)
        if job is not None:  # the event's layout, written after its step's forward
            assert resident_before + 1 > budget
            layout = job.target
            row = plan_state_row(layout)


def test_ring_slots_take_the_first_events_the_scheduler_publishes():
    """``judgeq_gkv_first_events`` maps request ids to first events (ints); the runner hands
    each to ``set_slot``, and a request missing from it is served without G-KV."""
    import numpy as np

    from judgeq_vllm.vllm_adapter.gpu.gkv_window import GKVQueryRing

    ring = GKVQueryRing.__new__(GKVQueryRing)  # host state only: no staged device writes
    ring.scheduled, ring._pending = np.zeros(4, dtype=bool), {}
    first_events = {"a": GKVSchedule(30, 0, 20, WINDOW, INTERVAL, BLOCK_SIZE, 1).first_event}
    for slot, req_id in ((1, "a"), (2, "b")):
        ring.set_slot(slot, first_events.get(req_id))
    assert ring._pending == {1: first_events["a"], 2: NO_SCHEDULE}
    assert ring.scheduled.tolist() == [False, True, False, False]
