"""G-KV: decode-time eviction with a global score (pure torch).

Liao et al., "G-KV: Decoding-Time KV Cache Eviction with Global Attention",
https://arxiv.org/abs/2512.00504, code github.com/microsoft/G-KV (read at 6db3b2e). The
formulas below follow ``gkv/model/compression/score_based.py`` (``ScoreBasedKV.update_kv``
with ``--suppressing_redundancy --mix_lambda 0.5 --enable_score_cache --alpha 0.8``,
``smooth_method="max"``, no pooling) and ``gkv/utils/compression_score.py``
(``compute_attention_scores`` with ``pooling="max"``; ``cal_similarity_triton``, the
default ``triton_similarity=True``), for one request (no padding).

NOTE on how G-KV differs from the prefill policies of this package: it compresses the
same request again and again. Every ``interval`` forward passes (the prefill is pass 0),
once a layer's cache holds more than ``budget`` rows, the last ``window`` queries of the
request score the cache and every kv head keeps its top ``budget - window`` rows plus the
last ``window`` rows. A running score ``F`` per kept row carries over from one
compression to the next: ``F`` of the ``budget - window`` scored rows kept last time is
passed back in as ``previous``; every other row (the previous window and the tokens new
since, exactly as the authors' code pads the cached scores with the current ones) starts
from its current local score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode import DecodeCompression, DecodePolicy

# eps of the key-norm division in the authors' Triton similarity kernel
_SIMILARITY_NORM_EPS = 1e-6


@dataclass
class GKVPolicy(DecodePolicy):
    """G-KV's decode-time compression: global score plus redundancy, per kv head.

    Parameters
    ----------
    window : int
        ``w``: the last ``w`` queries score the cache; the last ``w`` rows are always kept.
    interval : int
        Compress every ``interval`` forward passes of a request (the prefill is pass 0).
    alpha : float
        Memory decay of the global score: ``F = max(alpha * F_prev, S)``.
    mix_lambda : float
        Final score ``mix_lambda * F - (1 - mix_lambda) * R``.
    similarity_threshold : float
        Key cosine similarity above which the most recent similar key is spared from the
        redundancy sum (R-KV's rule).
    """

    window: int = 16
    interval: int = 128
    alpha: float = 0.8
    mix_lambda: float = 0.5
    similarity_threshold: float = 0.5
    name = "gkv"
    carries_scores = True

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"gkv: window={self.window} must be >= 1")
        # the query window must come from the steps after the last compression, whose
        # rows are the cache's last `window` ones
        if self.interval < self.window:
            raise ValueError(f"gkv: interval={self.interval} must be >= window={self.window}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"gkv: alpha={self.alpha} must be in [0, 1]")
        if not 0.0 <= self.mix_lambda <= 1.0:
            raise ValueError(f"gkv: mix_lambda={self.mix_lambda} must be in [0, 1]")

    def check_budget(self, budget: int) -> None:
        if budget <= self.window:
            raise ValueError(f"gkv: the budget ({budget} tokens) must exceed the window ({self.window})")

    def compress(
        self, queries: torch.Tensor, keys: torch.Tensor, scale: float, budget: int, previous: torch.Tensor | None
    ) -> DecodeCompression:
        """Scores one layer's cache and selects what it keeps: the top ``budget - window``
        scored rows, then the last ``window`` rows; ``global_scores`` ``[num_kv_heads,
        budget - window]`` is ``F`` of the scored kept rows (before the redundancy term),
        in ``kept`` order.

        Args:
            queries: ``[window, num_q_heads, head_dim]`` post-RoPE queries of the cache's last
                ``window`` rows, oldest first.
            keys: ``[num_kv_heads, L, head_dim]`` the cache, ``L > budget``.
            scale: attention softmax scale (``1/sqrt(head_dim)``: G-KV divides keys by it).
            budget: rows kept per kv head.
            previous: ``[num_kv_heads, m]`` ``F`` of the cache's first ``m`` rows (the last
                compression's ``global_scores``), or ``None`` before the first compression.
        """
        self.check_budget(budget)
        num_rows = keys.shape[1]
        if queries.shape[0] != self.window or num_rows <= budget:
            raise ValueError(
                f"gkv: compress needs {self.window} queries and more than {budget} rows, "
                f"got {queries.shape[0]} and {num_rows}"
            )
        global_scores = self.global_scores(normalise(self.local_scores(queries, keys, scale)), previous)
        final = self.mix_lambda * global_scores - (1.0 - self.mix_lambda) * self.redundancy_scores(keys)
        top = final.topk(budget - self.window, dim=-1).indices.sort(dim=-1).values
        window_rows = torch.arange(num_rows - self.window, num_rows).expand(keys.shape[0], -1)
        ranking = torch.cat([final, torch.full((keys.shape[0], self.window), float("inf"))], dim=-1)
        return DecodeCompression(torch.cat([top, window_rows], dim=-1), global_scores.gather(1, top), ranking)

    def local_scores(self, queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
        """``S``: per kv head, the mean over the window queries of the max over the group's
        query heads of their softmax attention, on the rows before the window.

        Returns:
            ``[num_kv_heads, L - window]`` fp32.
        """
        window, num_q_heads, head_dim = queries.shape
        num_kv_heads, num_rows, _ = keys.shape
        group = num_q_heads // num_kv_heads
        # [kv_head, group, window, head_dim]: query head q belongs to kv head q // group
        grouped = queries.float().permute(1, 0, 2).reshape(num_kv_heads, group, window, head_dim)
        logits = torch.einsum("hgqd,htd->hgqt", grouped, keys.float() * scale)
        # the window queries are the last rows: causal inside the window only
        future = torch.ones(window, window, dtype=torch.bool).triu(diagonal=1)
        logits[..., num_rows - window :] = logits[..., num_rows - window :].masked_fill(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return probs.amax(dim=1)[..., : num_rows - window].mean(dim=1)

    def global_scores(self, local: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """``F = max(alpha * F_prev, S)``; rows without a previous score take ``F_prev = S``."""
        if previous is None or self.alpha == 0:
            return local
        old = torch.cat([previous.float(), local[:, previous.shape[1] :]], dim=-1)
        return torch.maximum(old * self.alpha, local)

    def redundancy_scores(self, keys: torch.Tensor) -> torch.Tensor:
        """``R``: per kv head, a row's summed key cosine similarity to every other row, the
        most recent row above the threshold spared per column; divided by ``L``, softmaxed
        over all rows, restricted to the rows before the window and normalised by its max.

        Returns:
            ``[num_kv_heads, L - window]`` fp32.
        """
        keys = keys.float()
        num_kv_heads, num_rows, _ = keys.shape
        unit = keys / (keys.norm(dim=-1, keepdim=True) + _SIMILARITY_NORM_EPS)
        similarity = unit @ unit.transpose(1, 2)  # [kv_head, row m, column n]
        diagonal = torch.arange(num_rows)
        similarity[:, diagonal, diagonal] = 0.0
        # per column n, the largest row m above the threshold (-1: none) is zeroed
        above = similarity > self.similarity_threshold
        last_row = torch.where(above, diagonal[None, :, None], -1).amax(dim=1)  # [kv_head, n]
        head, column = torch.nonzero(last_row >= 0, as_tuple=True)
        similarity[head, last_row[head, column], column] = 0.0
        summed = similarity.sum(dim=-1) / num_rows
        redundancy = torch.softmax(summed, dim=-1)[:, : num_rows - self.window]
        return normalise(redundancy)


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Divides each kv head's scores by their max (G-KV's score normalisation)."""
    return scores / scores.amax(dim=-1, keepdim=True)
