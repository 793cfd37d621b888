"""Scoring and top-k selection of one layer for every compaction job of a step, on device.

The GPU counterpart of ``EvictionPolicy.select`` (``policies/base.py``), batched over the
step's jobs: the observation queries come from the layer's forward, the keys straight
from the paged cache (``score_paged``), and the selection is one ``topk`` + ``sort`` over
``[jobs, kv heads, tokens]``. Nothing here syncs with the host: every length it needs
was known when the scheduler planned the requests.

Protected tokens (the observation window, attention sinks) are ranked above every scored
token by a score of ``PROTECTED + position``, so that, as in ``select_keep``, they are
kept first and, when there are more of them than the budget, the most recent win.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...kernels import score_paged
from ...policies import EvictionPolicy, KnormPolicy, ObservationSource, StreamingLLMPolicy
from ..plan import EvictionPlan

# above any attention mass, recency rank or negated key norm; exact in float64 with a
# position added (positions < 2**31)
PROTECTED = 2.0**40


@dataclass(frozen=True)
class CompactionJobs:
    """The compaction jobs of one step, as device tensors (built once per step).

    Attributes:
        req_ids / plans: the jobs, in the order of every tensor below.
        obs_token_index: [sum n_obs] int64 rows of the step's query tensor that are the
            observation queries (the last ``n_obs`` tokens of each job's chunk).
        obs_query_start_loc: [J + 1] int32, job j owns ``obs_token_index[qsl[j]:qsl[j+1]]``.
        block_rows: [J, max_blocks] int32, the jobs' block-table rows.
        key_lens: [J] int32, ``L'`` (the observation queries are the last keys).
        num_scored: [J] int32, prompt tokens scored (before the protected tail).
        keep: [J] int64, rows kept per kv head (``plan.keep``, the largest layer's).
        layer_keep: [L, J] int64, rows kept per kv head in each layer (``plan.layer_keeps``),
            or None when every job keeps ``keep`` rows in every layer.
        dest_start: [J] int32, ``S``: where the kept rows go.
        protected: [J, max_prompt_len] bool, tokens kept whatever their score.
    """

    req_ids: list[str]
    plans: list[EvictionPlan]
    obs_token_index: torch.Tensor
    obs_query_start_loc: torch.Tensor
    block_rows: torch.Tensor
    key_lens: torch.Tensor
    num_scored: torch.Tensor
    prompt_lens: torch.Tensor
    keep: torch.Tensor
    layer_keep: torch.Tensor | None
    dest_start: torch.Tensor
    protected: torch.Tensor
    max_num_obs: int
    max_key_len: int
    max_num_scored: int
    max_prompt_len: int
    max_keep: int

    @property
    def num_jobs(self) -> int:
        return len(self.plans)

    def keep_of_layer(self, layer: int) -> torch.Tensor:
        """[J] rows kept per kv head in ``layer``."""
        return self.keep if self.layer_keep is None else self.layer_keep[layer]

    @property
    def num_kept(self) -> torch.Tensor:
        """``compact_paged``'s ``num_kept``: [J] (all layers alike) or [L, J]."""
        return self.keep if self.layer_keep is None else self.layer_keep


def protected_tail(policy: EvictionPolicy) -> int:
    """Tokens at the end of the prompt that the policy keeps unscored (pooling stops before them)."""
    return getattr(policy, "window", 0) if policy.observation_source != ObservationSource.NONE else 0


def build_jobs(
    policy: EvictionPolicy,
    req_ids: list[str],
    plans: list[EvictionPlan],
    query_ends: list[int],
    block_rows: torch.Tensor,
    device: torch.device,
) -> CompactionJobs:
    """Host-side description of the jobs, copied to ``device`` in a few small transfers.

    Args:
        query_ends: per job, the end of its chunk in the step's flat token order.
        block_rows: [J, max_blocks] int32 device tensor, the jobs' block-table rows.
    """
    tail = protected_tail(policy)
    num_obs = [plan.num_observations for plan in plans]
    obs_index = np.concatenate([np.arange(end - n, end) for end, n in zip(query_ends, num_obs)]) if plans else []
    obs_qsl = np.zeros(len(plans) + 1, dtype=np.int32)
    np.cumsum(num_obs, out=obs_qsl[1:])
    num_scored = [max(plan.prompt_len - tail, 1) for plan in plans]
    max_prompt_len = max(plan.prompt_len for plan in plans)
    protected = torch.zeros(len(plans), max_prompt_len, dtype=torch.bool)
    for j, plan in enumerate(plans):
        protected[j, : plan.prompt_len] = policy.protected_mask(plan.prompt_len)

    def to_device(values, dtype) -> torch.Tensor:
        host = torch.as_tensor(np.asarray(values), dtype=dtype)
        if device.type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    return CompactionJobs(
        req_ids=req_ids,
        plans=plans,
        obs_token_index=to_device(obs_index, torch.int64),
        obs_query_start_loc=to_device(obs_qsl, torch.int32),
        block_rows=block_rows,
        key_lens=to_device([plan.total_len for plan in plans], torch.int32),
        num_scored=to_device(num_scored, torch.int32),
        prompt_lens=to_device([plan.prompt_len for plan in plans], torch.int64),
        keep=to_device([plan.keep for plan in plans], torch.int64),
        layer_keep=(
            None if all(plan.uniform for plan in plans)
            else to_device(np.array([plan.layer_keeps for plan in plans]).T.copy(), torch.int64)
        ),
        dest_start=to_device([plan.first_kept_slot for plan in plans], torch.int32),
        protected=to_device(protected, torch.bool),
        max_num_obs=max(num_obs),
        max_key_len=max(plan.total_len for plan in plans),
        max_num_scored=max(num_scored),
        max_prompt_len=max_prompt_len,
        max_keep=max(plan.keep for plan in plans),
    )


def score_layer(
    policy: EvictionPolicy, jobs: CompactionJobs, query: torch.Tensor, kv_cache: torch.Tensor, scale: float
) -> torch.Tensor:
    """``[J, num_kv_heads, max_prompt_len]`` fp32 scores of the jobs' prompt tokens.

    Entries past a job's scored tokens are ``-inf`` (protected tails get their rank in
    :func:`select_kept`).

    Args:
        query: [num_tokens, num_q_heads, head_dim] the layer's post-RoPE queries of the step.
        kv_cache: [num_blocks, num_kv_heads, block_size, 2 * head_dim] the layer's cache,
            holding this step's keys already.
    """
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    positions = torch.arange(jobs.max_prompt_len, device=kv_cache.device)
    if isinstance(policy, StreamingLLMPolicy):
        scores = positions.float().expand(jobs.num_jobs, num_kv_heads, -1).clone()
    elif isinstance(policy, KnormPolicy):
        blocks = jobs.block_rows[:, positions // block_size].long()  # [J, T]
        keys = kv_cache[blocks, :, positions % block_size, : kv_cache.shape[-1] // 2]  # [J, T, H, D]
        scores = -keys.float().norm(dim=-1).transpose(1, 2)
    elif policy.observation_source != ObservationSource.NONE:
        scores = score_paged(
            query.index_select(0, jobs.obs_token_index),
            jobs.obs_query_start_loc,
            kv_cache,
            jobs.block_rows,
            jobs.key_lens,
            jobs.num_scored,
            scale,
            getattr(policy, "pool_kernel", 1),
            max_num_obs=jobs.max_num_obs,
            max_key_len=jobs.max_key_len,
            max_num_candidates=jobs.max_num_scored,
        )
        if jobs.max_num_scored < jobs.max_prompt_len:
            pad = jobs.max_prompt_len - jobs.max_num_scored
            scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        # -inf past each job's scored tokens already (score_paged's contract)
        return scores[..., : jobs.max_prompt_len]
    else:
        raise NotImplementedError(f"{policy.name} has no GPU scoring")
    return scores.masked_fill(positions >= jobs.prompt_lens[:, None, None], float("-inf"))


def select_kept(scores: torch.Tensor, jobs: CompactionJobs, layer: int) -> torch.Tensor:
    """``[J, num_kv_heads, max_keep]`` int64 kept token indices of ``layer``, ascending per row.

    Job ``j`` keeps ``k[j]`` tokens per head (``jobs.keep_of_layer(layer)``): its protected
    tokens first (the most recent if there are more than ``k[j]``), then its best-scored
    ones; columns past ``k[j]`` hold ``max_prompt_len`` (never read: compaction stops at
    ``k[j]``).
    """
    positions = torch.arange(jobs.max_prompt_len, device=scores.device)
    ranked = scores.double().masked_fill(jobs.protected[:, None, :], 0.0)
    ranked = ranked + jobs.protected[:, None, :] * (PROTECTED + positions.double())
    top = ranked.topk(jobs.max_keep, dim=-1).indices
    # topk ranks best first: the first k[j] columns are job j's top k[j]
    unused = torch.arange(jobs.max_keep, device=scores.device) >= jobs.keep_of_layer(layer)[:, None, None]
    return top.masked_fill(unused, jobs.max_prompt_len).sort(dim=-1).values
