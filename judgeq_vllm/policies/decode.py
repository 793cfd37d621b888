"""The decode-time policy contract: what the decode-event code calls.

NOTE on the model (docs/engine-design.md §6). A decode-time policy compresses the same
request again and again: every ``interval`` forward passes (the prefill is pass 0), once
a layer's cache holds more than ``budget`` rows, every kv head keeps ``budget`` of them.
The schedule is the same for every such policy (:meth:`DecodePolicy.compresses_at`); what
differs is the selection (:meth:`DecodePolicy.compress`) and what it needs: G-KV scores
with the queries of the cache's last ``window`` rows and carries a running score from one
compression to the next, StreamingLLM needs neither. The HF reference
(``reference/gkv.py``), the CPU attention and the GPU event step call only what this
class declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class DecodeCompression:
    """One compression of one layer.

    Attributes:
        kept: ``[num_kv_heads, budget]`` kept row indices of the compressed cache, ascending per head.
        global_scores: ``[num_kv_heads, m]`` the running score of the first ``m`` kept rows,
            which the next compression reads as ``previous`` (G-KV); ``None`` for policies
            that carry no score.
        ranking: ``[num_kv_heads, L]`` the score every row was ranked by, ``inf`` for rows
            kept whatever they score; ``None`` for positional policies. Tests use it to
            tell a bf16 near-tie from a wrong choice.
    """

    kept: torch.Tensor
    global_scores: torch.Tensor | None
    ranking: torch.Tensor | None = None


class DecodePolicy:
    """Base class of the decode-time policies (see the module note).

    Attributes:
        name: the ``--kv-eviction`` name.
        interval: compress every ``interval`` forward passes of a request.
        window: an event scores with the post-RoPE queries of the cache's last ``window``
            rows (0: it needs no queries, and the engines capture none).
        carries_scores: whether an event leaves a running score for the next one (the
            engines then keep it beside the KV cache).
    """

    name: ClassVar[str] = ""
    interval: int
    window: int
    carries_scores: ClassVar[bool] = False

    def check_budget(self, budget: int) -> None:
        """Raises ``ValueError`` when ``budget`` rows per kv head cannot hold what the policy always keeps."""
        raise NotImplementedError

    def compresses_at(self, forward_index: int, resident: int, budget: int) -> bool:
        """Whether the forward pass ``forward_index`` (0: prefill) ends with a compression,
        the cache holding ``resident`` rows after it (``output_length % divide_length == 0``
        and ``kv_cache_len > budget`` in the G-KV authors' code)."""
        return forward_index % self.interval == 0 and resident > budget

    def compress(
        self,
        queries: torch.Tensor | None,
        keys: torch.Tensor,
        scale: float,
        budget: int,
        previous: torch.Tensor | None,
    ) -> DecodeCompression:
        """Selects what one layer's cache keeps.

        Args:
            queries: ``[window, num_q_heads, head_dim]`` post-RoPE queries of the cache's last
                ``window`` rows, oldest first; ``None`` when ``window`` is 0.
            keys: ``[num_kv_heads, L, head_dim]`` the cache, ``L > budget``.
            scale: attention softmax scale.
            budget: rows kept per kv head.
            previous: the last compression's ``global_scores`` (``None``: no earlier
                compression, or a policy that carries none).
        """
        raise NotImplementedError
