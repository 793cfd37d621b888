from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EvictionPolicy, ScoreInputs


@dataclass
class KnormPolicy(EvictionPolicy):
    """Key L2 norm: keep the keys with the lowest norm, with their values.

    Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", EMNLP 2024, https://arxiv.org/abs/2406.11430. Query-free, so it needs
    no observation tokens at all.
    """

    name = "knorm"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys[:, : inputs.num_candidates].float().norm(dim=-1)
