from __future__ import annotations

from dataclasses import dataclass

from .snapkv import SnapKVPolicy


@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    """PyramidKV: SnapKV scores with budgets that shrink linearly from bottom to top layers.

    Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling", https://arxiv.org/abs/2406.02069. Budget schedule as in KVCache-Factory:
    with ``b`` the request's budget and ``w`` the window, layer 0 keeps
    ``max_num = 2(b-w) - min_num`` scored tokens and the top layer ``min_num = (b-w)//beta``,
    linearly in between, plus the window; the mean over layers stays close to ``b``. Every
    head of a layer keeps the same count, and the engine frees blocks down to the largest
    layer's count.

    Parameters
    ----------
    window : int
        Observation window: the last ``window`` prompt tokens.
    pool_kernel : int
        Width of the 1-D max-pool.
    beta : int
        Ratio of the bottom layer's budget to the top layer's.
    """

    beta: int = 20
    name = "pyramidkv"
    per_layer_budgets = True

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"pyramidkv: beta={self.beta} must be >= 1")

    def layer_keep_count(self, keep: int, num_candidates: int, layer_idx: int, num_layers: int) -> int:
        if keep >= num_candidates or num_layers == 1 or keep <= self.window:
            return keep
        scored = keep - self.window
        min_num = scored // self.beta
        max_num = 2 * scored - min_num
        # KVCache-Factory caps the bottom layer at the tokens available and moves the
        # surplus to the top, keeping the sum constant
        if max_num >= num_candidates - self.window:
            max_num = num_candidates - self.window
            min_num = 2 * scored - max_num
        step = (max_num - min_num) // (num_layers - 1)
        return max_num - layer_idx * step + self.window
