"""Compiles the eviction kernels before serving (vLLM's JIT monitor flags later compiles).

Runs the real scoring, selection, compaction and offsets paths once on the first layer's
cache with a fake job: block ids 0.., read-only for scoring, and a compaction whose rows
are all in place already (the kernel skips them, nothing is written). A second scoring
pass with more than 16K keys in its jobs compiles the 128-key tile variant. The kernels
take every per-step count as a runtime value (not specialised), so these two shapes are
all a serving engine compiles. Decode-time engines without a prefill policy (``gkv``,
``streamingllm-decode``) compile the compaction their events use, G-KV engines the
ring-row kernel (on the runner's own buffers) and the key-similarity kernel of the
redundancy term; the rest of G-KV's scoring is plain torch.
"""

from __future__ import annotations

import torch

from ...kernels import compact_paged, similarity_column_stats
from ...policies import ObservationSource
from ..plan import EvictionPlan
from .gkv_scoring import SIMILARITY_NORM_EPS
from .gkv_window import NO_SCHEDULE, apply_gkv_ring_rows
from .offsets import NO_PLAN, PLAN_FIELDS, apply_eviction_offsets, apply_layer_eviction_offsets
from .selection import build_jobs, score_layer, select_kept

# keys in one step's jobs above which scoring uses 128-key tiles (ScoreConfig.resolved)
_WIDE_TILE_KEYS = 16_384


def warm_up_kernels(runner) -> None:
    kv_cache = runner.kv_caches[0]
    num_blocks, _, block_size, _ = kv_cache.shape
    policy = runner.eviction_policy
    # the engine's block-table row stride is a kernel argument too: same width here
    table_width = runner.block_tables.block_tables[0].gpu.shape[1]
    if policy is not None:
        num_soft = policy.num_observations if policy.observation_source == ObservationSource.SOFT_TOKENS else 0
        longest = min(table_width, num_blocks) * block_size - num_soft
        if longest >= 1:
            # one short job (64-key tiles), then enough long ones for 128-key tiles
            long_len = min(longest, 8192)
            for prompt_len, num_jobs in ((min(256, longest), 1), (long_len, _WIDE_TILE_KEYS // long_len + 1)):
                _warm_up_scoring(runner, policy, kv_cache, prompt_len, num_soft, num_jobs, table_width)
    elif runner.gkv_policy is not None:
        _warm_up_compaction(kv_cache, table_width, keep=min(64, table_width * block_size))
    _warm_up_offsets(runner)
    if runner.layer_views is not None:
        _warm_up_layer_offsets(runner)
    if runner.gkv_ring is not None:
        _warm_up_ring_rows(runner)
        _warm_up_similarity(kv_cache, runner.gkv_policy)
    torch.accelerator.synchronize()


def _warm_up_scoring(runner, policy, kv_cache, prompt_len: int, num_soft: int, num_jobs: int, table_width: int) -> None:
    device = kv_cache.device
    num_obs = min(policy.num_observations, prompt_len)
    keep = min(64, prompt_len)
    plan = EvictionPlan(prompt_len, num_soft, num_obs, keep, (keep,) * runner.num_attention_layers, kv_cache.shape[2])
    # every job reads the same blocks: scoring only reads, and compaction finds its rows in place
    block_row = torch.arange(table_width, dtype=torch.int32, device=device) % kv_cache.shape[0]
    block_rows = block_row.expand(num_jobs, -1).contiguous()
    rows_per_job = max(num_obs, 1)
    query_ends = [rows_per_job * (j + 1) for j in range(num_jobs)]
    jobs = build_jobs(policy, [f"warm-up-{j}" for j in range(num_jobs)], [plan] * num_jobs, query_ends, block_rows, device)
    num_q_heads = runner.model_config.get_num_attention_heads(runner.parallel_config)
    head_dim = kv_cache.shape[-1] // 2
    query = torch.randn(rows_per_job * num_jobs, num_q_heads, head_dim, dtype=kv_cache.dtype, device=device)
    select_kept(score_layer(policy, jobs, query, kv_cache, head_dim**-0.5), jobs, 0)
    _compact_in_place(kv_cache, block_rows, plan.first_kept_slot, keep, jobs.dest_start)


def _warm_up_compaction(kv_cache, table_width: int, keep: int) -> None:
    device = kv_cache.device
    block_rows = (torch.arange(table_width, dtype=torch.int32, device=device) % kv_cache.shape[0])[None]
    _compact_in_place(kv_cache, block_rows, 0, keep, torch.zeros(1, dtype=torch.int32, device=device))


def _compact_in_place(kv_cache, block_rows, first: int, keep: int, dest_start) -> None:
    """A compaction whose kept rows are at their destinations already: compiled, nothing
    moved. Index dtypes as serving's (int64 kept rows and counts, int32 starts)."""
    num_jobs = block_rows.shape[0]
    in_place = torch.arange(first, first + keep, device=kv_cache.device).expand(1, num_jobs, kv_cache.shape[1], keep)
    num_kept = torch.full((num_jobs,), keep, dtype=torch.int64, device=kv_cache.device)
    compact_paged([kv_cache], block_rows, in_place, num_kept, dest_start=dest_start)


def _no_plan_step(runner) -> dict:
    """One decode token of a request without a plan: the offsets kernels only copy vLLM's
    values. The engine's block tables and slot mapping are passed (read, never written for
    such a row) because Triton specialises on their strides."""
    device = runner.device
    plan_state = torch.zeros(1, PLAN_FIELDS, dtype=torch.int32, device=device)
    plan_state[0, 0] = NO_PLAN
    return dict(
        idx_mapping=torch.zeros(1, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=device),
        seq_lens=torch.ones(1, dtype=torch.int32, device=device),
        positions=torch.zeros(1, dtype=torch.int64, device=device),
        plan_state=plan_state,
        block_table=runner.block_tables.block_tables[0].gpu,
        num_reqs=1,
        num_reqs_padded=1,
        num_tokens=1,
        num_tokens_padded=1,
        block_size=runner.kernel_block_size,
    )


def _warm_up_offsets(runner) -> None:
    device = runner.device
    apply_eviction_offsets(
        **_no_plan_step(runner),
        input_block_table=runner.block_tables.input_block_tables[0],
        slot_mapping=torch.zeros(1, dtype=torch.int64, device=device),
        logits_indices=torch.zeros(1, dtype=torch.int64, device=device),
        attn_seq_lens=torch.zeros(1, dtype=torch.int32, device=device),
        rope_positions=torch.zeros(1, dtype=torch.int64, device=device),
    )


def _warm_up_ring_rows(runner) -> None:
    # the runner's own ring rows and first events (their strides are serving's); a token of
    # a slot without a schedule points at the spare row, what every step rewrites anyway
    device = runner.device
    ring = runner.gkv_ring
    first_events = torch.full_like(ring.first_events.gpu, NO_SCHEDULE)
    apply_gkv_ring_rows(
        idx_mapping=torch.zeros(1, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=device),
        positions=torch.zeros(1, dtype=torch.int64, device=device),
        first_events=first_events,
        ring_rows=ring.ring_rows,
        num_reqs=1,
        num_tokens=1,
        num_tokens_padded=1,
        interval=ring.interval,
        window=ring.window,
    )


def _warm_up_similarity(kv_cache, policy) -> None:
    # keys laid out as an event gathers them ([J, N, H, D] seen as [J, H, N, D]), in the
    # cache's dtype, with int64 row counts: serving's argument types
    num_kv_heads, head_dim, rows = kv_cache.shape[1], kv_cache.shape[-1] // 2, 64
    keys = torch.zeros(1, rows, num_kv_heads, head_dim, dtype=kv_cache.dtype, device=kv_cache.device).transpose(1, 2)
    num_rows = torch.full((1,), rows, dtype=torch.int64, device=kv_cache.device)
    similarity_column_stats(keys, num_rows, policy.similarity_threshold, SIMILARITY_NORM_EPS)


def _warm_up_layer_offsets(runner) -> None:
    # the runner's own per-layer buffers: their strides are the run-time ones; what the
    # kernel writes into them is rewritten by every step that reads them
    views = runner.layer_views
    apply_layer_eviction_offsets(
        **_no_plan_step(runner),
        keep_deficits=views.keep_deficits.gpu,
        slot_mapping=runner.block_tables.slot_mappings[0],
        layer_attn_seq_lens=views.seq_lens,
        layer_slot_mappings=views.slot_mappings,
    )
