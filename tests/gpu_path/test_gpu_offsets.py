"""The GPU runner's offsets kernel against its loop reference (Triton interpreter on CPU)."""

import pytest
import torch

from judgeq_vllm.policies import KVBudget, make_policy
from judgeq_vllm.vllm_adapter.gpu.offsets import (
    NO_PLAN,
    PLAN_FIELDS,
    apply_eviction_offsets,
    apply_layer_eviction_offsets,
    keep_deficits,
    plan_state_row,
    reference_eviction_offsets,
    reference_layer_eviction_offsets,
)
from judgeq_vllm.vllm_adapter.plan import plan_request

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16


def plan_row(prompt_len, num_soft, keep):
    total = prompt_len + num_soft
    first_kept = (total - keep) // BLOCK_SIZE * BLOCK_SIZE
    return [total, num_soft, total - first_kept - keep, total - keep, first_kept // BLOCK_SIZE]


def make_batch(rows, num_tokens_padded, num_reqs_padded, max_num_reqs=8, max_blocks=64):
    """rows: (slot, plan row or None, num_computed, num_scheduled) per batch row."""
    gen = torch.Generator().manual_seed(0)
    plan_state = torch.zeros(max_num_reqs, PLAN_FIELDS, dtype=torch.int32)
    plan_state[:, 0] = NO_PLAN
    block_table = torch.randperm(max_num_reqs * max_blocks, generator=gen).view(max_num_reqs, max_blocks).int()
    idx_mapping, qsl, seq_lens, positions = [], [0], [], []
    for slot, plan, computed, scheduled in rows:
        if plan is not None:
            plan_state[slot] = torch.tensor(plan, dtype=torch.int32)
        idx_mapping.append(slot)
        qsl.append(qsl[-1] + scheduled)
        seq_lens.append(computed + scheduled)
        positions.extend(range(computed, computed + scheduled))
    num_tokens = len(positions)
    qsl += [num_tokens] * (num_reqs_padded - len(rows))
    seq_lens += [0] * (num_reqs_padded - len(rows))
    positions += [0] * (num_tokens_padded - num_tokens)
    tensors = dict(
        idx_mapping=torch.tensor(idx_mapping, dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        positions=torch.tensor(positions, dtype=torch.int64),
        plan_state=plan_state,
        block_table=block_table,
        input_block_table=torch.randint(0, 999, (max_num_reqs, max_blocks), generator=gen, dtype=torch.int32),
        slot_mapping=torch.randint(0, 9999, (num_tokens_padded,), generator=gen, dtype=torch.int64),
        logits_indices=torch.tensor(qsl[1 : len(rows) + 1], dtype=torch.int64) - 1,
        attn_seq_lens=torch.full((max_num_reqs,), -1, dtype=torch.int32),
        rope_positions=torch.full((num_tokens_padded + 4,), -1, dtype=torch.int64),
    )
    sizes = dict(
        num_reqs=len(rows), num_reqs_padded=num_reqs_padded, num_tokens=num_tokens,
        num_tokens_padded=num_tokens_padded, block_size=BLOCK_SIZE,
    )
    return {k: v.to(DEVICE) for k, v in tensors.items()}, sizes


@pytest.mark.parametrize("padded", [False, True])
def test_kernel_equals_reference(padded):
    rows = [
        (3, plan_row(300, 32, 64), 333, 1),  # decoding after compaction
        (0, plan_row(200, 0, 50), 210, 1),  # decoding, no soft tokens
        (5, None, 40, 1),  # no plan
        (1, plan_row(120, 32, 40), 100, 52),  # compaction step: chunk ends at L'
        (6, plan_row(500, 32, 100), 200, 90),  # early chunk of a planned prompt
        (2, plan_row(90, 0, 17), 90, 7),  # resumed chunk after the prompt (several tokens)
    ]
    num_tokens = sum(scheduled for *_, scheduled in rows)
    tensors, sizes = make_batch(rows, num_tokens + (9 if padded else 0), num_reqs_padded=8 if padded else len(rows))
    # host copies: the reference writes into them in place
    expected = {k: v.cpu().clone() for k, v in tensors.items()}
    apply_eviction_offsets(**tensors, **sizes)
    reference_eviction_offsets(**expected, **sizes)
    for name in ("input_block_table", "slot_mapping", "logits_indices", "attn_seq_lens", "rope_positions"):
        assert torch.equal(tensors[name].cpu(), expected[name]), name


def test_rules_on_a_compacted_request():
    """The formulas by hand for one request: P=300, n=32, k=64, block 16."""
    plan = plan_row(300, 32, 64)  # L'=332, S=(332-64)//16*16=256, delta=332-256-64=12
    assert plan == [332, 32, 12, 268, 16]
    tensors, sizes = make_batch([(0, plan, 340, 1), (1, plan, 300, 32)], 33, 2)
    bt = tensors["block_table"].cpu()
    logits_before = tensors["logits_indices"].clone()
    apply_eviction_offsets(**tensors, **sizes)
    # decode token at vLLM position 340: RoPE 308, logical slot 328, attention 341 - 268 rows from block 16
    assert int(tensors["rope_positions"][0]) == 308
    assert int(tensors["slot_mapping"][0]) == int(bt[0, 328 // 16]) * 16 + 328 % 16
    assert int(tensors["attn_seq_lens"][0]) == 341 - 268
    assert torch.equal(tensors["input_block_table"][0, :5].cpu(), bt[0, 16:21])
    # the compaction step: logical everything, first token sampled from the last real prompt token
    assert int(tensors["attn_seq_lens"][1]) == 332
    assert int(tensors["logits_indices"][1]) == int(logits_before[1]) - 32
    assert tensors["rope_positions"][1:33].tolist() == list(range(300, 332))


NUM_LAYERS = 4


def pyramid_plan(prompt_len, budget):
    plan = plan_request(prompt_len, make_policy("pyramidkv", window=8), KVBudget(tokens=budget), BLOCK_SIZE, NUM_LAYERS)
    assert not plan.uniform
    return plan


def layer_tensors(tensors, plans_by_slot, max_num_reqs=8):
    """The per-layer inputs and outputs for a batch made by make_batch (outputs poisoned)."""
    deficits = torch.zeros(max_num_reqs, NUM_LAYERS, dtype=torch.int32)
    for slot, plan in plans_by_slot.items():
        deficits[slot] = torch.tensor(keep_deficits(plan), dtype=torch.int32)
    names = ("idx_mapping", "query_start_loc", "seq_lens", "positions", "plan_state", "block_table", "slot_mapping")
    return {
        **{name: tensors[name] for name in names},
        "keep_deficits": deficits.to(DEVICE),
        "layer_attn_seq_lens": torch.full((NUM_LAYERS, max_num_reqs), -1, dtype=torch.int32, device=DEVICE),
        "layer_slot_mappings": torch.full(
            (NUM_LAYERS, tensors["slot_mapping"].shape[0] + 4), -7, dtype=torch.int64, device=DEVICE
        ),
    }


@pytest.mark.parametrize("padded", [False, True])
def test_layer_kernel_equals_reference(padded):
    pyramid, short = pyramid_plan(300, 64), pyramid_plan(120, 40)
    uniform = plan_request(200, make_policy("snapkv", window=8), KVBudget(tokens=50), BLOCK_SIZE, NUM_LAYERS)
    rows = [
        (3, plan_state_row(pyramid), 333, 1),  # decoding after a per-layer compaction
        (0, plan_state_row(uniform), 210, 1),  # decoding, uniform plan (deficits 0)
        (5, None, 40, 1),  # no plan
        (1, plan_state_row(short), 100, 20),  # compaction step: chunk ends at L'
        (2, plan_state_row(short), 125, 7),  # a question after the boundary (several tokens)
    ]
    num_tokens = sum(scheduled for *_, scheduled in rows)
    tensors, sizes = make_batch(rows, num_tokens + (9 if padded else 0), num_reqs_padded=8 if padded else len(rows))
    # vLLM's PAD_SLOT_ID in the padding, which the layers must keep
    tensors["slot_mapping"][num_tokens:] = -1
    layered = layer_tensors(tensors, {3: pyramid, 0: uniform, 1: short, 2: short})
    expected = {k: v.cpu().clone() for k, v in layered.items()}
    apply_layer_eviction_offsets(**layered, **sizes)
    reference_layer_eviction_offsets(**expected, **sizes)
    for name in ("layer_attn_seq_lens", "layer_slot_mappings"):
        assert torch.equal(layered[name].cpu(), expected[name]), name


def test_layer_rules_follow_the_plan():
    """Each layer's slot and length from EvictionPlan.layer_slot_shift / layer_evicted_len,
    and the layer keeping the most rows agrees with the shared kernel."""
    plan = pyramid_plan(300, 64)
    tensors, sizes = make_batch([(0, plan_state_row(plan), 340, 1), (1, None, 50, 2)], 3, 2)
    layered = layer_tensors(tensors, {0: plan})
    apply_layer_eviction_offsets(**layered, **sizes)
    bt = tensors["block_table"].cpu()
    for layer in range(NUM_LAYERS):
        logical = 340 - plan.layer_slot_shift(layer)
        assert int(layered["layer_slot_mappings"][layer, 0]) == int(bt[0, logical // 16]) * 16 + logical % 16
        assert int(layered["layer_attn_seq_lens"][layer, 0]) == 341 - plan.layer_evicted_len(layer)
        # the request without a plan keeps vLLM's slots and length
        assert torch.equal(layered["layer_slot_mappings"][layer, 1:3], tensors["slot_mapping"][1:3])
        assert int(layered["layer_attn_seq_lens"][layer, 1]) == 52
    assert plan.layer_keeps[0] == plan.keep
    apply_eviction_offsets(**tensors, **sizes)
    assert torch.equal(layered["layer_slot_mappings"][0, :3], tensors["slot_mapping"][:3])
    assert torch.equal(layered["layer_attn_seq_lens"][0, :2], tensors["attn_seq_lens"][:2])
