from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EvictionPolicy, ScoreInputs


@dataclass
class StreamingLLMPolicy(EvictionPolicy):
    """StreamingLLM: attention sinks plus the most recent tokens.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
    https://arxiv.org/abs/2309.17453. Keeps the first ``sinks`` tokens and the last
    ``budget - sinks`` prompt tokens; keys keep their original RoPE positions (no
    position shift), as KVCache-Factory and kvpress do.

    Parameters
    ----------
    sinks : int
        Number of leading tokens always kept.
    """

    sinks: int = 4
    name = "streamingllm"

    def __post_init__(self):
        if self.sinks < 0:
            raise ValueError(f"streamingllm: sinks={self.sinks} must be >= 0")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        recency = torch.arange(inputs.num_candidates, dtype=torch.float32)
        return recency.expand(inputs.num_kv_heads, -1).clone()

    def protected_mask(self, num_candidates: int) -> torch.Tensor:
        mask = torch.zeros(num_candidates, dtype=torch.bool)
        mask[: self.sinks] = True
        return mask
