"""Compiles the eviction kernels before serving (vLLM's JIT monitor flags later compiles).

Runs the real scoring, selection, compaction and offsets paths once on the first layer's
cache with a fake job: block ids 0.., read-only for scoring, and a compaction whose rows
are all in place already (the kernel skips them, nothing is written). A second scoring
pass with more than 16K keys compiles the 128-key tile variant when the cache is large
enough.
"""

from __future__ import annotations

import torch

from ...kernels import compact_paged
from ...policies import ObservationSource
from ..plan import EvictionPlan
from .offsets import NO_PLAN, PLAN_FIELDS, apply_eviction_offsets
from .selection import build_jobs, score_layer, select_kept

_LONG_PROMPT = 16_448


def warm_up_kernels(runner) -> None:
    kv_cache = runner.kv_caches[0]
    num_blocks, _, block_size, _ = kv_cache.shape
    policy = runner.eviction_policy
    for prompt_len in (256, _LONG_PROMPT):
        num_soft = policy.num_observations if policy.observation_source == ObservationSource.SOFT_TOKENS else 0
        blocks_needed = -(-(prompt_len + num_soft) // block_size)
        if blocks_needed > num_blocks:
            break
        _warm_up_scoring(runner, policy, kv_cache, prompt_len, num_soft, blocks_needed)
    _warm_up_offsets(runner)
    torch.accelerator.synchronize()


def _warm_up_scoring(runner, policy, kv_cache, prompt_len: int, num_soft: int, num_blocks: int) -> None:
    num_obs = min(policy.num_observations, prompt_len)
    keep = 64
    plan = EvictionPlan(prompt_len, num_soft, num_obs, keep, (keep,) * runner.num_attention_layers, kv_cache.shape[2])
    block_rows = torch.arange(num_blocks, dtype=torch.int32, device=kv_cache.device)[None, :]
    jobs = build_jobs(policy, ["warm-up"], [plan], [max(num_obs, 1)], block_rows, kv_cache.device)
    num_q_heads = runner.model_config.get_num_attention_heads(runner.parallel_config)
    head_dim = kv_cache.shape[-1] // 2
    query = torch.randn(max(num_obs, 1), num_q_heads, head_dim, dtype=kv_cache.dtype, device=kv_cache.device)
    select_kept(score_layer(policy, jobs, query, kv_cache, head_dim**-0.5), jobs)
    # kept rows already at their destinations: compiled, nothing moved
    in_place = torch.arange(keep, device=kv_cache.device).expand(1, kv_cache.shape[1], keep)[None]
    compact_paged([kv_cache], block_rows, in_place, jobs.keep)


def _warm_up_offsets(runner) -> None:
    device = runner.device
    plan_state = torch.zeros(1, PLAN_FIELDS, dtype=torch.int32, device=device)
    plan_state[0, 0] = NO_PLAN
    zeros32 = torch.zeros(2, dtype=torch.int32, device=device)
    apply_eviction_offsets(
        idx_mapping=zeros32[:1],
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=device),
        seq_lens=torch.ones(1, dtype=torch.int32, device=device),
        positions=torch.zeros(1, dtype=torch.int64, device=device),
        plan_state=plan_state,
        block_table=torch.zeros(1, 4, dtype=torch.int32, device=device),
        input_block_table=torch.zeros(1, 4, dtype=torch.int32, device=device),
        slot_mapping=torch.zeros(1, dtype=torch.int64, device=device),
        logits_indices=torch.zeros(1, dtype=torch.int64, device=device),
        attn_seq_lens=torch.zeros(1, dtype=torch.int32, device=device),
        rope_positions=torch.zeros(1, dtype=torch.int64, device=device),
        num_reqs=1,
        num_reqs_padded=1,
        num_tokens=1,
        num_tokens_padded=1,
        block_size=runner.kernel_block_size,
    )
