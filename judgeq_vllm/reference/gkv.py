"""The readable oracle of decode-time eviction: G-KV on a HF cache, as the authors run it.

Any :class:`DecodePolicy` runs on the same schedule here: ``StreamingLLMDecodePolicy``
(``streamingllm-decode``) keeps the sinks and the most recent rows instead of scoring,
and needs no query window (``policy.window == 0``: nothing is recorded).

NOTE on the schedule (``gkv/model/gen_patch.py`` and the patched attention of
microsoft/G-KV). Forward pass ``j = 0`` is the prefill; pass ``j >= 1`` feeds the
``j``-th generated token at position ``prompt_len + j - 1``. A pass first appends its KV
to the cache and attends over the whole (not yet compressed) cache; then, if ``j`` is a
multiple of ``interval`` and a layer's cache holds more than ``budget`` rows, G-KV
compresses that layer to ``budget`` rows per kv head, scoring with the post-RoPE queries
of the cache's last ``window`` rows: the last ``window`` prompt tokens at the prefill,
the last ``window`` fed tokens during decoding (their own forward passes recorded them:
no extra pass). The running global score of the kept rows carries over to the next
compression (``GKVPolicy.compress``).

``judgeq+gkv`` (``prefill_policy``): the prefill is :func:`hf.evicting_prefill` with that
policy (Judge Q's soft tokens appended, scored and dropped), and G-KV takes over from
pass ``interval`` on, with no global score yet.

Every layer holds the same number of rows at every step, so the compressions of one pass
happen in every layer or in none; the record keeps, per compression, each layer's kept
rows both as indices into the rows resident before it and as the original token
positions those rows hold.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from ..policies import DecodePolicy, EvictionPolicy, KVBudget
from .hf import _compress_cache, _prefill, _recording, _stop_ids, evicting_prefill, record_attention


@dataclass(frozen=True)
class GKVEviction:
    """One compression (all layers) during a decode-time generation.

    Attributes:
        forward_index: the pass it ended (0: the prefill).
        num_tokens: tokens whose KV had been computed when it ran (prompt plus the tokens fed
            so far; soft tokens not counted).
        resident: rows per (layer, kv head) before it.
        kept: per layer, ``[num_kv_heads, budget]`` indices into those rows, ascending.
        kept_positions: per layer, ``[num_kv_heads, budget]`` the original token positions
            of the kept rows.
        rankings: per layer, the policy's ``[num_kv_heads, resident]`` ranking scores
            (``DecodeCompression.ranking``), or ``None`` for a positional policy.
    """

    forward_index: int
    num_tokens: int
    resident: int
    kept: list[torch.Tensor]
    kept_positions: list[torch.Tensor]
    rankings: list[torch.Tensor | None]


@dataclass
class GKVResult:
    """What :func:`generate_gkv` did.

    Attributes:
        token_ids: greedy tokens (the prompt excluded), stopped at a stop token (included)
            or ``max_new_tokens``.
        prompt_len: tokens in the prompt.
        prefill_kept: per layer, the prefill policy's kept prompt indices (``judgeq+gkv``),
            or ``None``.
        evictions: the decode-time policy's compressions, in order.
        resident_after_pass: rows per (layer, kv head) at the end of every pass's attention,
            before that pass's compression (the peak the cache reaches).
    """

    token_ids: list[int]
    prompt_len: int
    prefill_kept: list[torch.Tensor] | None
    evictions: list[GKVEviction]
    resident_after_pass: list[int]


class _QueryWindow:
    """The last ``window`` post-RoPE queries of every layer, one decode pass at a time."""

    def __init__(self, window: int):
        self.queries: dict[int, deque[torch.Tensor]] = {}
        self.window = window

    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> None:
        # query [1, Hq, 1, D] -> [Hq, D]
        rows = self.queries.setdefault(layer_idx, deque(maxlen=self.window))
        rows.append(query[0, :, -1, :].cpu())

    def layer(self, layer_idx: int) -> torch.Tensor:
        """``[window, Hq, D]``, oldest first."""
        return torch.stack(list(self.queries[layer_idx]))


class _GKVState:
    """The cache's decode-time bookkeeping: global scores (G-KV) and original positions of every row."""

    def __init__(self, policy: DecodePolicy, budget: int, scale: float, positions: list[torch.Tensor]):
        self.policy, self.budget, self.scale = policy, budget, scale
        self.positions = positions  # per layer [num_kv_heads, rows]
        self.previous: list[torch.Tensor | None] = [None] * len(positions)
        self.evictions: list[GKVEviction] = []

    def append_position(self, position: int) -> None:
        for layer, rows in enumerate(self.positions):
            self.positions[layer] = torch.cat([rows, torch.full((rows.shape[0], 1), position)], dim=1)

    def compress(
        self, cache: DynamicCache, queries: Callable[[int], torch.Tensor], forward_index: int, num_tokens: int
    ) -> None:
        """Compresses every layer; ``queries(layer)`` gives that layer's window (read only
        for a policy with one)."""
        kept_per_layer, kept_positions, rankings = [], [], []
        resident = cache.layers[0].keys.shape[2]
        for layer, cache_layer in enumerate(cache.layers):
            window = queries(layer) if self.policy.window else None
            compression = self.policy.compress(
                window, cache_layer.keys[0].cpu(), self.scale, self.budget, self.previous[layer]
            )
            self.previous[layer] = compression.global_scores
            kept_per_layer.append(compression.kept)
            rankings.append(compression.ranking)
            self.positions[layer] = self.positions[layer].gather(1, compression.kept)
            kept_positions.append(self.positions[layer].clone())
        _compress_cache(cache, kept_per_layer)
        self.evictions.append(GKVEviction(forward_index, num_tokens, resident, kept_per_layer, kept_positions, rankings))


@torch.inference_mode()
def generate_gkv(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    policy: DecodePolicy,
    budget: int,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] | None = None,
    prefill_policy: EvictionPolicy | None = None,
) -> GKVResult:
    """Greedy generation with decode-time compressions every ``policy.interval`` passes.

    Args:
        model: from :func:`hf.load_reference_model`.
        prompt_ids: the prompt's token ids.
        policy: G-KV's knobs, or another decode-time policy (``StreamingLLMDecodePolicy``).
        budget: rows kept per (layer, kv head) at each compression (``policy.check_budget``).
        max_new_tokens: generation length limit.
        stop_token_ids: tokens that end generation (default: the model's EOS ids).
        prefill_policy: evicts at the end of prefill instead of G-KV (``judgeq+gkv``),
            keeping ``min(budget, prompt_len)`` tokens per head.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    policy.check_budget(budget)
    prompt_len = len(prompt_ids)
    if prompt_len == 0:
        raise ValueError("the prompt is empty")
    scale = model.model.layers[0].self_attn.scaling
    num_kv_heads = model.config.num_key_value_heads
    prefill_kept = None
    if prefill_policy is not None:
        prefill = evicting_prefill(model, prompt_ids, prefill_policy, KVBudget(tokens=budget))
        cache, logits, prefill_kept = prefill.cache, prefill.logits, prefill.kept
        positions = prefill_kept if prefill_kept is not None else _all_positions(len(cache.layers), num_kv_heads, prompt_len)
        state = _GKVState(policy, budget, scale, [rows.clone() for rows in positions])
        resident_after_pass = [prompt_len]
    else:
        embeds = model.get_input_embeddings()(torch.tensor([list(prompt_ids)], device=model.device))
        with _recording(min(policy.window, prompt_len)) as recorder:
            out, cache = _prefill(model, embeds, prompt_len)
        logits = out.logits[0, -1]
        state = _GKVState(policy, budget, scale, _all_positions(len(cache.layers), num_kv_heads, prompt_len))
        resident_after_pass = [prompt_len]
        if policy.compresses_at(0, prompt_len, budget):
            state.compress(cache, lambda layer: recorder.queries[layer].cpu(), 0, prompt_len)

    stop = _stop_ids(model, stop_token_ids)
    window = _QueryWindow(policy.window)
    token, tokens = int(logits.argmax()), [int(logits.argmax())]
    forward_index = 0
    while len(tokens) < max_new_tokens and token not in stop:
        forward_index += 1
        position = prompt_len + forward_index - 1
        with record_attention(window):
            out = model(
                input_ids=torch.tensor([[token]], device=model.device),
                position_ids=torch.tensor([[position]], device=model.device),
                past_key_values=cache,
                use_cache=True,
            )
        state.append_position(position)
        resident = cache.layers[0].keys.shape[2]
        resident_after_pass.append(resident)
        if policy.compresses_at(forward_index, resident, budget):
            state.compress(cache, window.layer, forward_index, position + 1)
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
    return GKVResult(tokens, prompt_len, prefill_kept, state.evictions, resident_after_pass)


def _all_positions(num_layers: int, num_kv_heads: int, length: int) -> list[torch.Tensor]:
    return [torch.arange(length).expand(num_kv_heads, -1).clone() for _ in range(num_layers)]
