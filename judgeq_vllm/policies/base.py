"""The eviction-policy contract, shared by the HF reference, training and the vLLM engine.

NOTE on the model of eviction used everywhere in this project: eviction happens once, at
the end of prefill. A policy looks at one layer at a time and turns *observation queries*
(the last prompt tokens, or Judge Q's soft tokens appended after the prompt) and the
layer's keys into one score per (kv head, prompt token). A shared selection step then
keeps the top-k tokens of every kv head, with the same k for every head of a layer (so
the paged KV layout stays rectangular and whole blocks can be freed), always keeping the
tokens the policy protects (attention sinks, the observation window). Policies are pure
torch: they never import vLLM or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F


class ObservationSource(str, Enum):
    """Where a policy's observation queries come from."""

    # no queries: the score depends on keys or positions only
    NONE = "none"
    # the last `window` prompt tokens (SnapKV, H2O, PyramidKV)
    PROMPT_WINDOW = "prompt_window"
    # soft tokens appended after the prompt, whose KV is dropped after scoring (Judge Q)
    SOFT_TOKENS = "soft_tokens"


@dataclass(frozen=True)
class ScoreInputs:
    """What a policy sees of one layer at the end of prefill (a single request).

    Attributes:
        queries: ``[n_obs, num_q_heads, head_dim]`` post-RoPE observation queries. They are
            the last ``n_obs`` positions of the sequence whose keys are ``keys`` (empty
            for policies that need no queries).
        keys: ``[num_kv_heads, key_len, head_dim]`` post-RoPE keys of every token the
            observation queries could attend to (Judge Q: prompt + soft tokens).
        num_candidates: keys ``[0, num_candidates)`` are the prompt tokens that can be
            kept or evicted; any key after them is an observation token's own.
        scale: the attention softmax scale (``1/sqrt(head_dim)`` for Llama).
        layer_idx: index of this layer.
        num_layers: number of layers of the model.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    num_candidates: int
    scale: float
    layer_idx: int = 0
    num_layers: int = 1

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]


def observation_attention(inputs: ScoreInputs) -> torch.Tensor:
    """Softmax attention of the observation queries over the keys, summed per kv head.

    Query ``i`` sits at position ``key_len - n_obs + i`` and, causally, sees keys
    ``[0, key_len - n_obs + i]``; the softmax runs over exactly that range in fp32. The
    probabilities are summed over the observation queries and over the query heads of
    each GQA group (query head ``q`` belongs to kv head ``q // group``, as HF's
    ``repeat_kv`` lays them out).

    Returns:
        ``[num_kv_heads, num_candidates]`` fp32 summed attention on the candidate keys.
    """
    queries, keys = inputs.queries.float(), inputs.keys.float()
    n_obs, num_q_heads, _ = queries.shape
    num_kv_heads, key_len, _ = keys.shape
    group = num_q_heads // num_kv_heads
    # [kv_head, group * n_obs, head_dim]: the queries of one GQA group side by side
    grouped = queries.permute(1, 0, 2).reshape(num_kv_heads, group * n_obs, -1)
    logits = torch.einsum("hqd,htd->hqt", grouped, keys) * inputs.scale
    query_pos = torch.arange(key_len - n_obs, key_len).repeat(group)
    visible = torch.arange(key_len)[None, :] <= query_pos[:, None]
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.sum(dim=1)[:, : inputs.num_candidates]


def max_pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D max-pool over the token axis, stride 1, same length (SnapKV's smoothing).

    Args:
        scores: ``[num_kv_heads, n]``.
        kernel: odd pooling width; 1 means no pooling.
    """
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    return F.max_pool1d(scores[:, None, :], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0, :]


def pooled_attention_scores(inputs: ScoreInputs, pool_kernel: int, window: int) -> torch.Tensor:
    """Observation attention, max-pooled over the tokens before the last ``window`` ones.

    The window tokens are protected by the policies that use this, so pooling stops
    before them and their own scores do not spill into their neighbours (KVCache-Factory
    pools only the prefix).
    """
    scores = observation_attention(inputs)
    prefix = max(inputs.num_candidates - window, 0)
    scores[:, :prefix] = max_pool_scores(scores[:, :prefix], pool_kernel)
    return scores


def tail_mask(num_candidates: int, window: int) -> torch.Tensor:
    """``[num_candidates]`` bool, True on the last ``window`` tokens."""
    mask = torch.zeros(num_candidates, dtype=torch.bool)
    if window > 0:
        mask[max(num_candidates - window, 0) :] = True
    return mask


class EvictionPolicy:
    """Base class: one subclass per method, its hyperparameters as dataclass fields.

    Subclasses implement :meth:`score`; they may override :meth:`protected_mask` (tokens
    always kept) and :meth:`layer_keep_count` (per-layer budgets).
    """

    name: str = ""
    observation_source: ObservationSource = ObservationSource.NONE
    # whether layer_keep_count may differ between layers (engines then need per-layer
    # attention lengths and slot mappings)
    per_layer_budgets: bool = False

    @property
    def num_observations(self) -> int:
        """How many observation queries the policy needs (0 for query-free policies)."""
        return 0

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """Importance of each candidate token; higher is kept first.

        Returns:
            ``[num_kv_heads, num_candidates]`` fp32 scores.
        """
        raise NotImplementedError

    def protected_mask(self, num_candidates: int) -> torch.Tensor:
        """``[num_candidates]`` bool: tokens kept whatever their score."""
        return torch.zeros(num_candidates, dtype=torch.bool)

    def layer_keep_count(self, keep: int, num_candidates: int, layer_idx: int, num_layers: int) -> int:
        """Tokens kept per kv head in layer ``layer_idx`` when the request's budget is ``keep``."""
        return keep

    def select(self, inputs: ScoreInputs, keep: int) -> torch.Tensor:
        """Scores one layer and returns the kept token indices, ``[num_kv_heads, k]`` sorted."""
        k = self.layer_keep_count(keep, inputs.num_candidates, inputs.layer_idx, inputs.num_layers)
        return select_keep(self.score(inputs), k, self.protected_mask(inputs.num_candidates))


def select_keep(scores: torch.Tensor, keep: int, protected: torch.Tensor) -> torch.Tensor:
    """Top-``keep`` tokens per kv head, protected tokens first; the one selection step.

    Every head keeps exactly ``min(keep, n)`` tokens. Protected tokens are kept before any
    scored one; if there are more protected tokens than ``keep``, the most recent of them
    are kept (a ratio budget on a short prompt can fall below the window size).

    Args:
        scores: ``[num_kv_heads, n]`` scores of the candidate tokens.
        keep: tokens to keep per head (> 0).
        protected: ``[n]`` bool mask of tokens kept whatever their score.

    Returns:
        ``[num_kv_heads, min(keep, n)]`` int64 token indices, ascending per head.
    """
    num_kv_heads, n = scores.shape
    if keep >= n:
        return torch.arange(n).expand(num_kv_heads, n).clone()
    protected_idx = protected.nonzero().flatten()[-keep:]
    num_free = keep - protected_idx.numel()
    free_scores = scores.float().masked_fill(protected[None, :], float("-inf"))
    top = free_scores.topk(num_free, dim=-1).indices
    kept = torch.cat([protected_idx.expand(num_kv_heads, -1), top], dim=-1)
    return kept.sort(dim=-1).values
