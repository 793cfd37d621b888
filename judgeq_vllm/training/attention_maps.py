"""Attention over the prompt, computed from captured post-RoPE queries and keys, and the loss.

NOTE on what is compared (Judge Q, arXiv 2509.10798, section 3): for every layer and query
head, the soft tokens' attention over the prompt positions, averaged over the soft
tokens, should match the response tokens' attention over the prompt positions, averaged
over the response tokens. The loss is the mean squared error between these two
``[prompt_len]`` maps, averaged over layers and query heads.

Normalisation, made explicit: each row is the model's own softmax over every key its
query can see (causally: the prompt, then the earlier response or soft tokens), restricted
to the prompt columns, so a row sums to less than one when the query also looks at its
own segment. ``renormalize=True`` instead renormalises each restricted row to sum to one
(a softmax over the prompt columns only).

Rows are computed in chunks of queries, and only the query rows that are needed, so a
long prompt never materialises a ``[seq, seq]`` matrix.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# logits elements per chunk of query rows (fp32: 128 MiB)
CHUNK_ELEMENTS = 1 << 25


def mean_prompt_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    prompt_len: int,
    scale: float,
    renormalize: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Mean attention of the queries over the first ``prompt_len`` keys, per query head.

    Args:
        query: ``[num_q_heads, n, head_dim]``: the queries of the *last* ``n`` positions of
            the sequence whose keys are ``key`` (query ``i`` sits at
            ``key_len - n + i`` and sees keys ``[0, key_len - n + i]``).
        key: ``[num_kv_heads, key_len, head_dim]``; query head ``h`` reads kv head
            ``h // (num_q_heads // num_kv_heads)``, as HF's ``repeat_kv`` lays them out.
        prompt_len: the columns returned (the prompt's keys, first in the sequence).
        scale: the attention softmax scale.
        renormalize: renormalise each row over the prompt columns (see the module note).
        chunk_elements: bound on the logits computed at once.

    Returns:
        ``[num_q_heads, prompt_len]`` fp32, differentiable in ``query`` and ``key``.
    """
    query, key = query.float(), key.float()
    num_q_heads, n, head_dim = query.shape
    num_kv_heads, key_len, _ = key.shape
    group = num_q_heads // num_kv_heads
    first = key_len - n
    rows = max(1, chunk_elements // max(1, num_q_heads * key_len))
    total = query.new_zeros(num_q_heads, prompt_len)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        visible = first + stop
        chunk = query[:, start:stop].reshape(num_kv_heads, group, stop - start, head_dim)
        logits = torch.einsum("hgqd,hkd->hgqk", chunk, key[:, :visible]) * scale
        positions = torch.arange(first + start, first + stop, device=key.device)
        future = torch.arange(visible, device=key.device)[None, :] > positions[:, None]
        probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)[..., :prompt_len]
        if renormalize:
            probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        total = total + probs.sum(dim=2).reshape(num_q_heads, prompt_len)
    return total / n


def _layer_loss(query: torch.Tensor, key: torch.Tensor, target: torch.Tensor, scale: float, renormalize: bool) -> torch.Tensor:
    predicted = mean_prompt_attention(query, key, target.shape[-1], scale, renormalize)
    return (predicted - target).square().mean()


def layer_loss(query: torch.Tensor, key: torch.Tensor, target: torch.Tensor, scale: float, renormalize: bool) -> torch.Tensor:
    """MSE between the queries' mean prompt attention and ``target`` ``[num_q_heads, prompt_len]``,
    averaged over heads and positions.

    The probabilities are recomputed in the backward pass instead of being kept for every
    layer (activation checkpointing), so training memory does not grow with
    ``layers * heads * n_soft * prompt_len``.
    """
    return checkpoint(_layer_loss, query, key, target, scale, renormalize, use_reentrant=False)
