"""The GPU path's G-KV pieces on CPU (Triton interpreter): the ring-row kernel against its
loop reference, the batched selection against ``GKVPolicy.compress``, and one event step
(scoring, compaction, global scores, plan rows) against a gather-based reference."""

import pytest
import torch

from judgeq_vllm.policies import GKVPolicy
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
