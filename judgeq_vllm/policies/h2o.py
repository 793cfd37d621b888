from __future__ import annotations

from dataclasses import dataclass

from .snapkv import SnapKVPolicy


@dataclass
class H2OPolicy(SnapKVPolicy):
    """H2O (heavy hitters) applied once at prefill, as KVCache-Factory runs it.

    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", NeurIPS 2023, https://arxiv.org/abs/2306.14048. The original
    accumulates attention during decoding; this prefill variant accumulates the
    attention of the last ``window`` prompt queries, without pooling, and keeps the
    window.

    Parameters
    ----------
    window : int
        Observation window: the last ``window`` prompt tokens.
    """

    pool_kernel: int = 1
    name = "h2o"
