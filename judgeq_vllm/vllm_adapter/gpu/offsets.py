"""Per-step physical offsets of compacted requests on Model Runner V2: one Triton launch.

NOTE on what it computes (docs/gpu-path-design.md §2.2). vLLM's own buffers stay
logical (positions, seq_lens: they drive the sampler, min_tokens and prefill detection).
For each batch row ``b`` of request slot ``r`` with plan row ``plan[r] = (L', n_soft,
delta, evicted, shift_blocks)`` and logical ``seq = seq_lens[b]`` the kernel writes:

| what | rule | into |
|---|---|---|
| RoPE position of token t | ``pos - (pos >= L' ? n_soft : 0)`` | ``rope_positions[t]`` (ours) |
| KV slot of token t, if ``pos >= L'`` | ``block_table[r, q // bs] * bs + q % bs``, ``q = pos - delta`` | ``slot_mapping[t]`` (vLLM's, in place) |
| attention length | ``seq - (seq > L' ? evicted : 0)`` | ``attn_seq_lens[b]`` (ours) |
| attention block row, if ``seq > L'`` | ``block_table[r, i + shift_blocks]`` | ``input_block_table[b, i]`` (vLLM's, in place) |
| first-token logits, if ``seq == L'`` | ``logits_indices[b] - n_soft`` | ``logits_indices[b]`` (in place) |

Every rule is conditioned on the position, so the plan row can be written on the
compaction step itself (only the logits rule fires then) and stays valid until the slot
gets a new request. Rows without a plan hold ``L' = NO_PLAN`` and are copied unchanged.
Padded rows and tokens (CUDA graphs) are copied too: graphs read our buffers at every
padded size.

Per-layer budgets (PyramidKV, docs/gpu-path-design.md §4.7): blocks, ``S`` and the block
row shift are the same in every layer; layer ``l`` keeps ``k_l = k - d_l`` rows, so its
tokens go ``d_l`` slots further left and its attention reads ``d_l`` fewer rows.
``layer_eviction_offsets_kernel`` writes, from the same plan row plus the slot's keep
deficits ``d[r, l]``, one attention length per (layer, batch row) and one slot mapping per
(layer, token); it runs only on steps whose batch reads such a cache:

| what | rule | into |
|---|---|---|
| layer ``l``'s KV slot of token t | ``pos >= L'`` ? the slot of ``pos - delta - d_l`` : ``slot_mapping[t]`` | ``layer_slot_mappings[l, t]`` |
| layer ``l``'s attention length | ``seq - (seq > L' ? evicted + d_l : 0)`` | ``layer_attn_seq_lens[l, b]`` |
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..plan import EvictionPlan

# plan_state columns
TOTAL_LEN, NUM_SOFT, SLOT_SHIFT, EVICTED_LEN, SHIFT_BLOCKS = range(5)
PLAN_FIELDS = 5
# L' of a slot without a plan: no position reaches it
NO_PLAN = 2**31 - 1
_BLOCK = 256


def plan_state_row(plan: EvictionPlan) -> list[int]:
    """The ``plan_state`` row of a request with ``plan`` (columns above)."""
    return [plan.total_len, plan.num_soft, plan.slot_shift, plan.total_len - plan.keep, plan.freed_blocks]


def keep_deficits(plan: EvictionPlan) -> list[int]:
    """``d_l = k - k_l`` per layer: ``delta_l = delta + d_l`` and ``L' - k_l = evicted + d_l``."""
    return [plan.keep - layer_keep for layer_keep in plan.layer_keeps]


# the counts change every step: specialising on them (== 1, multiple of 16) would compile
# new variants in the middle of serving
@triton.jit(do_not_specialize=["num_reqs", "num_tokens", "num_tokens_padded"])
def eviction_offsets_kernel(
    idx_mapping,
    query_start_loc,
    seq_lens,
    positions,
    plan_state,
    block_table,
    input_block_table,
    slot_mapping,
    logits_indices,
    attn_seq_lens,
    rope_positions,
    num_reqs,
    num_tokens,
    num_tokens_padded,
    s_plan: tl.int64,
    s_bt: tl.int64,
    s_ibt: tl.int64,
    block_size,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    if b == tl.num_programs(0) - 1:
        # the last program copies the RoPE positions of the padding tokens
        for start in range(num_tokens, num_tokens_padded, BLOCK):
            o = start + tl.arange(0, BLOCK)
            m = o < num_tokens_padded
            tl.store(rope_positions + o, tl.load(positions + o, mask=m), mask=m)
        return
    seq = tl.load(seq_lens + b)
    if b >= num_reqs:
        tl.store(attn_seq_lens + b, seq)
        return
    r = tl.load(idx_mapping + b).to(tl.int64)
    plan = plan_state + r * s_plan
    total_len = tl.load(plan + 0)
    num_soft = tl.load(plan + 1)
    slot_shift = tl.load(plan + 2)
    evicted_len = tl.load(plan + 3)
    shift_blocks = tl.load(plan + 4)
    compacted = seq > total_len
    attn_len = tl.where(compacted, seq - evicted_len, seq)
    tl.store(attn_seq_lens + b, attn_len)
    if (seq == total_len) & (num_soft > 0):
        # the compaction step: sample the first token from the last real prompt token
        tl.store(logits_indices + b, tl.load(logits_indices + b) - num_soft)
    row = block_table + r * s_bt
    q_start = tl.load(query_start_loc + b)
    q_end = tl.load(query_start_loc + b + 1)
    for start in range(q_start, q_end, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < q_end
        pos = tl.load(positions + o, mask=m, other=0)
        after = pos >= total_len
        tl.store(rope_positions + o, tl.where(after, pos - num_soft, pos), mask=m)
        logical = pos - slot_shift
        moved = m & after
        block = tl.load(row + logical // block_size, mask=moved, other=0).to(tl.int64)
        tl.store(slot_mapping + o, block * block_size + logical % block_size, mask=moved)
    if compacted:
        num_blocks = (attn_len + block_size - 1) // block_size
        out_row = input_block_table + b * s_ibt
        for start in range(0, num_blocks, BLOCK):
            o = start + tl.arange(0, BLOCK)
            m = o < num_blocks
            tl.store(out_row + o, tl.load(row + shift_blocks + o, mask=m), mask=m)


def apply_eviction_offsets(
    idx_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    positions: torch.Tensor,
    plan_state: torch.Tensor,
    block_table: torch.Tensor,
    input_block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    logits_indices: torch.Tensor,
    attn_seq_lens: torch.Tensor,
    rope_positions: torch.Tensor,
    num_reqs: int,
    num_reqs_padded: int,
    num_tokens: int,
    num_tokens_padded: int,
    block_size: int,
) -> None:
    """Launches :func:`eviction_offsets_kernel` on the current stream (no host sync).

    Args:
        idx_mapping: [num_reqs] int32, batch row -> request slot.
        query_start_loc: [num_reqs_padded + 1] int32.
        seq_lens: [>= num_reqs_padded] int32 logical lengths (vLLM's, padded rows 0).
        positions: [>= num_tokens_padded] int64 logical positions (vLLM's).
        plan_state: [max_num_reqs, PLAN_FIELDS] int32 plan rows, by request slot.
        block_table: [max_num_reqs, max_blocks] int32, by request slot (never edited).
        input_block_table: [max_num_reqs, max_blocks] int32, by batch row (edited).
        slot_mapping: [>= num_tokens] int64 (edited).
        logits_indices: [num_reqs] int64 (edited).
        attn_seq_lens: [>= num_reqs_padded] int32 (written).
        rope_positions: [>= num_tokens_padded] int64 (written).
    """
    eviction_offsets_kernel[(num_reqs_padded + 1,)](
        idx_mapping, query_start_loc, seq_lens, positions, plan_state, block_table, input_block_table,
        slot_mapping, logits_indices, attn_seq_lens, rope_positions,
        num_reqs, num_tokens, num_tokens_padded,
        plan_state.stride(0), block_table.stride(0), input_block_table.stride(0), block_size,
        BLOCK=_BLOCK,
    )


@triton.jit(do_not_specialize=["num_reqs", "num_tokens", "num_tokens_padded"])
def layer_eviction_offsets_kernel(
    idx_mapping,
    query_start_loc,
    seq_lens,
    positions,
    plan_state,
    keep_deficits,
    block_table,
    slot_mapping,
    layer_attn_seq_lens,
    layer_slot_mappings,
    num_reqs,
    num_tokens,
    num_tokens_padded,
    s_plan: tl.int64,
    s_deficit: tl.int64,
    s_bt: tl.int64,
    s_layer_seq: tl.int64,
    s_layer_slot: tl.int64,
    block_size,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    layer = tl.program_id(1)
    out_slots = layer_slot_mappings + layer * s_layer_slot
    if b == tl.num_programs(0) - 1:
        # the last program of each layer copies the padding slots (PAD_SLOT_ID: not written)
        for start in range(num_tokens, num_tokens_padded, BLOCK):
            o = start + tl.arange(0, BLOCK)
            m = o < num_tokens_padded
            tl.store(out_slots + o, tl.load(slot_mapping + o, mask=m), mask=m)
        return
    out_seq = layer_attn_seq_lens + layer * s_layer_seq + b
    seq = tl.load(seq_lens + b)
    if b >= num_reqs:
        tl.store(out_seq, seq)
        return
    r = tl.load(idx_mapping + b).to(tl.int64)
    plan = plan_state + r * s_plan
    total_len = tl.load(plan + 0)
    slot_shift = tl.load(plan + 2)
    evicted_len = tl.load(plan + 3)
    deficit = tl.load(keep_deficits + r * s_deficit + layer)
    tl.store(out_seq, tl.where(seq > total_len, seq - evicted_len - deficit, seq))
    row = block_table + r * s_bt
    q_start = tl.load(query_start_loc + b)
    q_end = tl.load(query_start_loc + b + 1)
    for start in range(q_start, q_end, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < q_end
        pos = tl.load(positions + o, mask=m, other=0)
        moved = m & (pos >= total_len)
        logical = pos - slot_shift - deficit
        block = tl.load(row + logical // block_size, mask=moved, other=0).to(tl.int64)
        slot = tl.where(moved, block * block_size + logical % block_size, tl.load(slot_mapping + o, mask=m))
        tl.store(out_slots + o, slot, mask=m)


def apply_layer_eviction_offsets(
    idx_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    positions: torch.Tensor,
    plan_state: torch.Tensor,
    keep_deficits: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    layer_attn_seq_lens: torch.Tensor,
    layer_slot_mappings: torch.Tensor,
    num_reqs: int,
    num_reqs_padded: int,
    num_tokens: int,
    num_tokens_padded: int,
    block_size: int,
) -> None:
    """Launches :func:`layer_eviction_offsets_kernel` on the current stream (no host sync).

    Args (as :func:`apply_eviction_offsets`, plus):
        keep_deficits: [max_num_reqs, L] int32 ``k - k_l`` by request slot (read only where
            the slot has a plan; 0 in every layer for a uniform plan).
        slot_mapping: [>= num_tokens_padded] int64 vLLM's slots (the source of the tokens
            that stay where vLLM put them, and of the padding).
        layer_attn_seq_lens: [L, >= num_reqs_padded] int32 (written).
        layer_slot_mappings: [L, >= num_tokens_padded] int64 (written).
    """
    num_layers = layer_attn_seq_lens.shape[0]
    layer_eviction_offsets_kernel[(num_reqs_padded + 1, num_layers)](
        idx_mapping, query_start_loc, seq_lens, positions, plan_state, keep_deficits, block_table, slot_mapping,
        layer_attn_seq_lens, layer_slot_mappings,
        num_reqs, num_tokens, num_tokens_padded,
        plan_state.stride(0), keep_deficits.stride(0), block_table.stride(0),
        layer_attn_seq_lens.stride(0), layer_slot_mappings.stride(0), block_size,
        BLOCK=_BLOCK,
    )


def reference_eviction_offsets(
    idx_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    positions: torch.Tensor,
    plan_state: torch.Tensor,
    block_table: torch.Tensor,
    input_block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    logits_indices: torch.Tensor,
    attn_seq_lens: torch.Tensor,
    rope_positions: torch.Tensor,
    num_reqs: int,
    num_reqs_padded: int,
    num_tokens: int,
    num_tokens_padded: int,
    block_size: int,
) -> None:
    """The table of the module note as plain loops (the kernel's test oracle)."""
    rope_positions[:num_tokens_padded] = positions[:num_tokens_padded]
    attn_seq_lens[:num_reqs_padded] = seq_lens[:num_reqs_padded]
    for b in range(num_reqs):
        r = int(idx_mapping[b])
        total_len, num_soft, slot_shift, evicted_len, shift_blocks = (int(x) for x in plan_state[r, :PLAN_FIELDS])
        seq = int(seq_lens[b])
        if seq > total_len:
            attn_seq_lens[b] = seq - evicted_len
            num_blocks = -(-(seq - evicted_len) // block_size)
            input_block_table[b, :num_blocks] = block_table[r, shift_blocks : shift_blocks + num_blocks]
        if seq == total_len and num_soft > 0:
            logits_indices[b] -= num_soft
        for t in range(int(query_start_loc[b]), int(query_start_loc[b + 1])):
            pos = int(positions[t])
            if pos >= total_len:
                rope_positions[t] = pos - num_soft
                logical = pos - slot_shift
                slot_mapping[t] = int(block_table[r, logical // block_size]) * block_size + logical % block_size


def reference_layer_eviction_offsets(
    idx_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    positions: torch.Tensor,
    plan_state: torch.Tensor,
    keep_deficits: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    layer_attn_seq_lens: torch.Tensor,
    layer_slot_mappings: torch.Tensor,
    num_reqs: int,
    num_reqs_padded: int,
    num_tokens: int,
    num_tokens_padded: int,
    block_size: int,
) -> None:
    """The per-layer table of the module note as plain loops (the kernel's test oracle)."""
    for layer in range(layer_attn_seq_lens.shape[0]):
        layer_slot_mappings[layer, :num_tokens_padded] = slot_mapping[:num_tokens_padded]
        layer_attn_seq_lens[layer, :num_reqs_padded] = seq_lens[:num_reqs_padded]
        for b in range(num_reqs):
            r = int(idx_mapping[b])
            total_len, _, slot_shift, evicted_len, _ = (int(x) for x in plan_state[r, :PLAN_FIELDS])
            deficit = int(keep_deficits[r, layer])
            seq = int(seq_lens[b])
            if seq > total_len:
                layer_attn_seq_lens[layer, b] = seq - evicted_len - deficit
            for t in range(int(query_start_loc[b]), int(query_start_loc[b + 1])):
                pos = int(positions[t])
                if pos >= total_len:
                    logical = pos - slot_shift - deficit
                    layer_slot_mappings[layer, t] = (
                        int(block_table[r, logical // block_size]) * block_size + logical % block_size
                    )
