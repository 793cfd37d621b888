from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EvictionPolicy, ScoreInputs
from .decode import DecodeCompression, DecodePolicy

# leading tokens both StreamingLLM policies keep by default (the paper's four sinks)
DEFAULT_SINKS = 4


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

    sinks: int = DEFAULT_SINKS
    name = "streamingllm"

    def __post_init__(self):
        _check_sinks(self.name, self.sinks)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        recency = torch.arange(inputs.num_candidates, dtype=torch.float32)
        return recency.expand(inputs.num_kv_heads, -1).clone()

    def protected_mask(self, num_candidates: int) -> torch.Tensor:
        mask = torch.zeros(num_candidates, dtype=torch.bool)
        mask[: self.sinks] = True
        return mask


@dataclass
class StreamingLLMDecodePolicy(DecodePolicy):
    """StreamingLLM during decoding, on G-KV's schedule.

    :class:`StreamingLLMPolicy` evicts once, at the end of prefill, and then lets the
    cache grow by a row per generated token. This one compresses again every
    ``interval`` forward passes (the prefill is pass 0) once the cache exceeds the budget,
    as G-KV does, so a request's resident KV stays within ``budget + interval`` rows
    however long it generates. Each compression keeps the first ``sinks`` resident rows
    and the last ``budget - sinks``, every kv head the same. The kept rows stay in order,
    so the first ``sinks`` resident rows are always the prompt's first tokens. No
    queries and no running score: the engines capture no query window for it.

    Parameters
    ----------
    sinks : int
        Number of leading tokens always kept.
    interval : int
        Compress every ``interval`` forward passes of a request.
    """

    sinks: int = DEFAULT_SINKS
    interval: int = 128
    name = "streamingllm-decode"
    window = 0

    def __post_init__(self):
        _check_sinks(self.name, self.sinks)
        if self.interval < 1:
            raise ValueError(f"{self.name}: interval={self.interval} must be >= 1")

    def check_budget(self, budget: int) -> None:
        # at least one recent row besides the sinks
        if budget <= self.sinks:
            raise ValueError(f"{self.name}: the budget ({budget} tokens) must exceed the sinks ({self.sinks})")

    def compress(
        self, queries: torch.Tensor | None, keys: torch.Tensor, scale: float, budget: int, previous: torch.Tensor | None
    ) -> DecodeCompression:
        """The sinks and the most recent rows of one layer's cache (``queries``, ``scale``
        and ``previous`` are not read)."""
        self.check_budget(budget)
        num_kv_heads, num_rows = keys.shape[:2]
        if num_rows <= budget:
            raise ValueError(f"{self.name}: compress needs more than {budget} rows, got {num_rows}")
        kept = self.kept_rows(torch.tensor([num_rows]), budget)
        return DecodeCompression(kept.repeat(num_kv_heads, 1), None)

    def kept_rows(self, num_rows: torch.Tensor, budget: int) -> torch.Tensor:
        """``[J, budget]`` kept indices into each of ``J`` caches of ``num_rows`` ``[J]`` rows
        (``> budget``), ascending: ``0 .. sinks - 1``, then the last ``budget - sinks``. The
        selection the CPU path (through :meth:`compress`) and the GPU event step share."""
        offsets = torch.arange(budget, device=num_rows.device)
        # offset o >= sinks is recent row o - sinks, i.e. row num_rows - budget + o
        return torch.where(offsets < self.sinks, offsets, num_rows[:, None] - budget + offsets)


def _check_sinks(name: str, sinks: int) -> None:
    if sinks < 0:
        raise ValueError(f"{name}: sinks={sinks} must be >= 0")
