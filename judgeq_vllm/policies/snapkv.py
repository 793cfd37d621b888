from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EvictionPolicy, ObservationSource, ScoreInputs, pooled_attention_scores, tail_mask


@dataclass
class SnapKVPolicy(EvictionPolicy):
    """SnapKV: the last prompt tokens vote for the keys they attend to.

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
    https://arxiv.org/abs/2404.14469. Settings as in KVCache-Factory: the attention of the
    last ``window`` prompt queries, summed over them and over each GQA group, max-pooled
    over the tokens before the window; the window itself is always kept and counts
    towards the budget.

    Parameters
    ----------
    window : int
        Observation window: the last ``window`` prompt tokens.
    pool_kernel : int
        Width of the 1-D max-pool over the token axis (odd; 1 disables pooling).
    """

    window: int = 32
    pool_kernel: int = 7
    name = "snapkv"
    observation_source = ObservationSource.PROMPT_WINDOW

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"{self.name}: window={self.window} must be >= 1")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"{self.name}: pool_kernel={self.pool_kernel} must be an odd number >= 1")

    @property
    def num_observations(self) -> int:
        return self.window

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return pooled_attention_scores(inputs, self.pool_kernel, self.window)

    def protected_mask(self, num_candidates: int) -> torch.Tensor:
        return tail_mask(num_candidates, self.window)
