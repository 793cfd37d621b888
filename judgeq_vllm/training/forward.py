"""Model forwards that hand every layer's post-RoPE queries and keys to a callback.

NOTE on the cheap training forward: the prompt's KV does not depend on the soft tokens
(attention is causal and they come after it), so a prompt is run once without gradients,
and only the ``n_soft`` soft tokens are then run, with gradients, on a cache holding the
prompt's KV. Each layer's soft queries and keys (prompt keys followed by the soft ones)
reach the callback, which turns them into that layer's loss term on the spot.

The forwards use the decoder stack only (``model.base_model``): no LM head, so no
``[seq, vocab]`` logits. The model must come from ``load_reference_model`` (its attention
function is the one that calls the recorder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from ..reference import record_attention

# (layer index, query [num_q_heads, q_len, head_dim], key [num_kv_heads, kv_len, head_dim])
LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class _Hook:
    """Adapts a callback to the recorder interface, dropping the batch axis (batch is 1)."""

    callback: LayerCallback

    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> None:
        self.callback(layer_idx, query[0], key[0])


def attention_scale(model: torch.nn.Module) -> float:
    """The softmax scale of the model's attention (``1/sqrt(head_dim)`` for Llama)."""
    return float(model.base_model.layers[0].self_attn.scaling)


def prefill(model: torch.nn.Module, token_ids: Sequence[int], on_layer: LayerCallback) -> DynamicCache:
    """Runs ``token_ids`` from position 0 without gradients; returns the filled cache."""
    ids = torch.tensor([list(token_ids)], device=model.device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), record_attention(_Hook(on_layer)):
        model.base_model(
            input_ids=ids,
            position_ids=torch.arange(ids.shape[1], device=model.device)[None],
            past_key_values=cache,
            use_cache=True,
        )
    return cache


def truncated_cache(cache: DynamicCache, length: int, config) -> DynamicCache:
    """A new cache holding the first ``length`` positions of ``cache`` (which is unchanged),
    e.g. the prompt's KV out of a prompt+response prefill."""
    out = DynamicCache(config=config)
    for layer_idx, layer in enumerate(cache.layers):
        out.update(layer.keys[:, :, :length], layer.values[:, :, :length], layer_idx)
    return out


def soft_token_forward(
    model: torch.nn.Module, embeddings: torch.Tensor, cache: DynamicCache, on_layer: LayerCallback
) -> None:
    """Runs the soft tokens right after the cached prompt (positions ``prompt_len`` on).

    Gradients flow to ``embeddings`` when grad mode is on; ``cache`` gains the soft
    tokens' KV, so pass a fresh :func:`truncated_cache` each time.

    Args:
        embeddings: ``[n_soft, hidden]``, any float dtype (cast to the model's).
    """
    prompt_len = cache.get_seq_length()
    positions = torch.arange(prompt_len, prompt_len + embeddings.shape[0], device=model.device)
    with record_attention(_Hook(on_layer)):
        model.base_model(
            inputs_embeds=embeddings.to(model.device, model.dtype)[None],
            position_ids=positions[None],
            past_key_values=cache,
            use_cache=True,
        )
