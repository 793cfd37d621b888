from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..soft_tokens import SoftTokens
from .base import EvictionPolicy, ObservationSource, ScoreInputs, pooled_attention_scores, tail_mask


@dataclass
class JudgeQPolicy(EvictionPolicy):
    """Judge Q: trained soft tokens appended after the prompt judge which keys to keep.

    Liu et al., "Judge Q: Trainable Queries for Optimized Information Retention in KV
    Cache Eviction", AAAI 2026, https://arxiv.org/abs/2509.10798. ``n_soft`` soft tokens
    (learned embeddings) follow the prompt at prefill; their post-RoPE queries score the
    prompt keys exactly as SnapKV's window does (softmax, summed over soft tokens and
    GQA groups, max-pooled), the top-k keys per head are kept, and the soft tokens' own
    KV is dropped: decoding resumes at position ``prompt_len``.

    Parameters
    ----------
    soft_tokens : SoftTokens
        The trained embeddings, ``[n_soft, hidden]``, with the base model they fit.
    pool_kernel : int
        Width of the 1-D max-pool over the token axis (odd; 1 disables pooling).
    window : int
        Last prompt tokens always kept besides the scored ones (0: the soft tokens alone
        decide, as in the paper's description).
    """

    soft_tokens: SoftTokens | None = field(default=None, repr=False)
    pool_kernel: int = 7
    window: int = 0
    name = "judgeq"
    observation_source = ObservationSource.SOFT_TOKENS

    def __post_init__(self):
        if self.soft_tokens is None:
            raise ValueError(
                "judgeq needs a soft-token artifact: train one with `judgeq-vllm train` "
                "or use a query-window policy such as `snapkv`"
            )
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"judgeq: pool_kernel={self.pool_kernel} must be an odd number >= 1")
        if self.window < 0:
            raise ValueError(f"judgeq: window={self.window} must be >= 0")

    @property
    def num_observations(self) -> int:
        return self.soft_tokens.num_tokens

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return pooled_attention_scores(inputs, self.pool_kernel, self.window)

    def protected_mask(self, num_candidates: int) -> torch.Tensor:
        return tail_mask(num_candidates, self.window)
