"""The readable oracle: prefill, evict, then greedy-decode on a compressed HF cache.

NOTE on how this reference works. The model runs with an attention function of our own
(registered in transformers' ``AttentionInterface``) that computes exactly what ``sdpa``
computes and, while a prefill is being observed, records every layer's post-RoPE queries
of the observation tokens together with the keys they attended to. After the prefill,
each layer's ``DynamicCache`` entry is replaced by the kept rows of every kv head (so the
heads of one layer keep different tokens, all the same count), the soft tokens' KV is
dropped, and decoding continues from position ``prompt_len`` with explicit position ids.
Batch size is 1 and there is no padding, so no attention mask is needed: prefill is
causal, and a decode step sees the whole compressed cache. (The attention function is
still registered with sdpa's mask builder, so that other users of the model, such as
training's cached soft-token forward or padded batch generation, get correct masks.)

Compress, then ask (``compress_prefix=N``): only the first ``N`` prompt tokens (a
document) are prefilled and observed (Judge Q's soft tokens follow them), the cache is
compressed, and the rest of the prompt (the question) is then fed one token at a time at
positions ``N..P-1`` against the compressed cache; the first generated token comes from
the question's last token. One token at a time needs no attention mask even when layers
keep different counts (PyramidKV).

Everything the vLLM path does must agree with this file: same kept indices per (layer,
head), same greedy tokens (fp32 on CPU).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..policies import EvictionPolicy, KVBudget, ObservationSource, ScoreInputs
from ..soft_tokens import hf_model_fingerprint

ATTN_IMPLEMENTATION = "judgeq_reference"


@dataclass
class _PrefillRecorder:
    """Collects, per layer, the last ``num_observations`` queries and all keys."""

    num_observations: int
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> None:
        # query [1, Hq, T, D] -> [n_obs, Hq, D]; key [1, Hkv, T, D] -> [Hkv, T, D]
        start = query.shape[2] - self.num_observations
        self.queries[layer_idx] = query[0, :, start:, :].permute(1, 0, 2)
        self.keys[layer_idx] = key[0]


class AttentionRecorder(Protocol):
    """Anything that wants every layer's post-RoPE attention inputs during a forward."""

    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """``query`` ``[batch, Hq, q_len, D]``; ``key`` ``[batch, Hkv, kv_len, D]``, the
        cached keys followed by the new ones (exactly what the layer attends to)."""


_RECORDER: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar(
    "judgeq_prefill_recorder", default=None
)


def _reference_attention(module, query, key, value, attention_mask, **kwargs):
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.record(module.layer_idx, query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _reference_attention)
# Without a registered mask builder transformers passes no mask to a custom attention
# function, and sdpa's `is_causal` then aligns the causal mask top-left: wrong as soon as
# several new tokens attend to a cache (or to left padding). sdpa's own builder still
# returns no mask for the cases the reference runs (one causal prefill, 1-token decode).
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def record_attention(recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """Calls ``recorder.record`` from every layer of a model loaded by
    :func:`load_reference_model` while the block runs (this thread/context only)."""
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def _recording(num_observations: int) -> contextlib.AbstractContextManager[_PrefillRecorder]:
    return record_attention(_PrefillRecorder(num_observations))


def load_reference_model(path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Loads an HF causal LM wired to the recording attention, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    return model.eval()


@dataclass
class EvictionResult:
    """What :func:`generate` did.

    Attributes:
        token_ids: generated tokens (the prompt excluded), greedy, stopped at a stop token
            (included, as ``generate`` does) or ``max_new_tokens``.
        prompt_len: tokens in the prompt (soft tokens not counted).
        kept_indices: per layer, ``[num_kv_heads, k]`` kept prompt-token indices (sorted);
            ``None`` when the prompt fit the budget and nothing was evicted.
        cache_lengths: per layer, KV entries per head left after prefill (soft KV dropped;
            with a compression boundary, the question's entries included).
        positions: the position id of every generated token's *input* step, i.e. the
            first generated token is fed back at ``positions[0] == prompt_len``.
    """

    token_ids: list[int]
    prompt_len: int
    kept_indices: list[torch.Tensor] | None
    cache_lengths: list[int]
    positions: list[int]


def _observation_count(policy: EvictionPolicy, prompt_len: int) -> int:
    if policy.observation_source == ObservationSource.PROMPT_WINDOW:
        return min(policy.num_observations, prompt_len)
    return policy.num_observations if policy.observation_source == ObservationSource.SOFT_TOKENS else 0


def _stop_ids(model: torch.nn.Module, stop_token_ids: Sequence[int] | None) -> set[int]:
    if stop_token_ids is not None:
        return set(stop_token_ids)
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _soft_token_embeddings(model: torch.nn.Module, policy: EvictionPolicy) -> torch.Tensor:
    soft = policy.soft_tokens
    soft.check_model(str(model.config.name_or_path), hf_model_fingerprint(model))
    return soft.embeddings.to(model.device, model.dtype)[None]


def _compress_cache(cache: DynamicCache, kept: list[torch.Tensor]) -> None:
    for layer, kept_idx in zip(cache.layers, kept):
        index = kept_idx.to(layer.keys.device)[None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    policy: EvictionPolicy,
    budget: KVBudget,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] | None = None,
    force_eviction_pass: bool = False,
    compress_prefix: int | None = None,
) -> EvictionResult:
    """Greedy generation with one-shot eviction at the end of prefill.

    Args:
        model: from :func:`load_reference_model`.
        prompt_ids: the prompt's token ids.
        policy: the eviction policy (scores and protected tokens).
        budget: tokens kept per (layer, kv head); a prompt that fits is not evicted.
        max_new_tokens: generation length limit.
        stop_token_ids: tokens that end generation (default: the model's EOS ids).
        force_eviction_pass: run the observation/eviction machinery even when the prompt
            fits the budget (keeping every prompt token); tests use it to show that soft
            tokens and the compressed cache leave the output unchanged.
        compress_prefix: ``N``: only the first ``N`` prompt tokens are candidates, the
            rest (the question) is fed after compression (module note); ``None``: all.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    prefill = evicting_prefill(model, prompt_ids, policy, budget, force_eviction_pass, compress_prefix)
    cache_lengths = [layer.keys.shape[2] for layer in prefill.cache.layers]
    prompt_len = len(prompt_ids)
    tokens, positions = _greedy_decode(
        model, prefill.cache, int(prefill.logits.argmax()), prompt_len, max_new_tokens, _stop_ids(model, stop_token_ids)
    )
    return EvictionResult(tokens, prompt_len, prefill.kept, cache_lengths, positions)


@dataclass
class EvictedPrefill:
    """The state :func:`generate` decodes from.

    Attributes:
        logits: next-token logits of the prompt's last token.
        cache: the compressed cache (soft KV dropped; the question after a boundary fed).
        kept: per layer, ``[num_kv_heads, k]`` kept prompt-token indices, or ``None``.
    """

    logits: torch.Tensor
    cache: DynamicCache
    kept: list[torch.Tensor] | None


def evicting_prefill(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    policy: EvictionPolicy,
    budget: KVBudget,
    force_eviction_pass: bool = False,
    compress_prefix: int | None = None,
) -> EvictedPrefill:
    """Prefill with one-shot eviction at its end (arguments as :func:`generate`'s)."""
    prompt_len = len(prompt_ids)
    if prompt_len == 0:
        raise ValueError("the prompt is empty")
    num_candidates = prompt_len if compress_prefix is None else compress_prefix
    if not 1 <= num_candidates <= prompt_len:
        raise ValueError(f"compress_prefix={compress_prefix} must be in [1, {prompt_len}]")
    keep = budget.keep_count(num_candidates)
    evict = force_eviction_pass or keep < num_candidates
    if not evict:
        # nothing is evicted, so nothing is held back for later: one plain prefill
        num_candidates = prompt_len
    num_obs = _observation_count(policy, num_candidates) if evict else 0

    device = model.device
    ids = torch.tensor([list(prompt_ids[:num_candidates])], device=device)
    embeds = model.get_input_embeddings()(ids)
    if evict and policy.observation_source == ObservationSource.SOFT_TOKENS:
        embeds = torch.cat([embeds, _soft_token_embeddings(model, policy)], dim=1)

    with _recording(num_obs) if evict else contextlib.nullcontext() as recorder:
        out, cache = _prefill(model, embeds, num_candidates)

    kept = None
    if evict:
        attention = model.model.layers[0].self_attn
        num_layers = len(cache.layers)
        kept = [
            policy.select(
                ScoreInputs(
                    queries=recorder.queries[layer].cpu(),
                    keys=recorder.keys[layer].cpu(),
                    num_candidates=num_candidates,
                    scale=attention.scaling,
                    layer_idx=layer,
                    num_layers=num_layers,
                ),
                keep,
            )
            for layer in range(num_layers)
        ]
        _compress_cache(cache, kept)
    logits = out.logits[0, -1]
    if num_candidates < prompt_len:
        logits = _feed(model, cache, prompt_ids[num_candidates:], num_candidates)
    return EvictedPrefill(logits, cache, kept)


def _feed(model: torch.nn.Module, cache: DynamicCache, token_ids: Sequence[int], start: int) -> torch.Tensor:
    """Feeds ``token_ids`` one at a time at positions ``start, start + 1, ...``; returns the
    last one's logits."""
    for offset, token in enumerate(token_ids):
        out = model(
            input_ids=torch.tensor([[token]], device=model.device),
            position_ids=torch.tensor([[start + offset]], device=model.device),
            past_key_values=cache,
            use_cache=True,
        )
    return out.logits[0, -1]


def _prefill(model: torch.nn.Module, embeds: torch.Tensor, prompt_len: int) -> tuple[Any, DynamicCache]:
    """One causal prefill of ``embeds`` (the prompt, maybe followed by soft tokens) into a
    fresh cache; the logits are those of the last *real* prompt token, never a soft one."""
    cache = DynamicCache(config=model.config)
    out = model(
        inputs_embeds=embeds,
        position_ids=torch.arange(embeds.shape[1], device=model.device)[None],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=torch.tensor([prompt_len - 1], device=model.device),
    )
    return out, cache


def _greedy_decode(
    model: torch.nn.Module, cache: DynamicCache, first_token: int, prompt_len: int, max_new_tokens: int, stop: set[int]
) -> tuple[list[int], list[int]]:
    """Greedy tokens from ``first_token`` on, fed back from position ``prompt_len``; and
    the position of every token's input step."""
    token, tokens, positions = first_token, [first_token], [prompt_len]
    while len(tokens) < max_new_tokens and token not in stop:
        out = model(
            input_ids=torch.tensor([[token]], device=model.device),
            position_ids=torch.tensor([[positions[-1]]], device=model.device),
            past_key_values=cache,
            use_cache=True,
        )
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        positions.append(positions[-1] + 1)
    return tokens, positions


@dataclass
class RecordedPrefill:
    """The post-RoPE queries and keys one prefill recorded, per layer.

    Attributes:
        queries: layer -> ``[num_recorded, num_q_heads, head_dim]``, the last queries.
        keys: layer -> ``[num_kv_heads, seq_len, head_dim]``.
        prompt_len: tokens in the prompt (soft tokens not counted).
        scale: the attention softmax scale.
        num_layers: layers of the model.
    """

    queries: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]
    prompt_len: int
    scale: float
    num_layers: int

    def score_inputs(self, policy: EvictionPolicy, layer: int) -> ScoreInputs:
        """What ``policy`` sees of ``layer`` (its own number of observation queries)."""
        num_obs = _observation_count(policy, self.prompt_len)
        queries = self.queries[layer]
        if num_obs > queries.shape[0]:
            raise ValueError(f"{policy.name} observes {num_obs} queries, only {queries.shape[0]} were recorded")
        return ScoreInputs(
            queries=queries[queries.shape[0] - num_obs :].cpu(),
            keys=self.keys[layer].cpu(),
            num_candidates=self.prompt_len,
            scale=self.scale,
            layer_idx=layer,
            num_layers=self.num_layers,
        )


@torch.inference_mode()
def generate_many(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    configs: Sequence[tuple[EvictionPolicy, KVBudget]],
    max_new_tokens: int,
    stop_token_ids: Sequence[int] | None = None,
) -> tuple[list[EvictionResult], RecordedPrefill]:
    """:func:`generate` for several ``(policy, budget)`` pairs off one prefill.

    Prefill and its queries/keys do not depend on the policy (apart from Judge Q's soft
    tokens), so one recorded prefill serves every configuration; each then gets exactly
    what :func:`generate` does after its prefill (selection, cache compression, greedy
    decoding). All policies must share one kind of observation: soft tokens (the first
    policy's are used), or not. Returns one result per configuration and the recording.
    """
    if not configs:
        raise ValueError("generate_many needs at least one (policy, budget)")
    soft = {policy.observation_source == ObservationSource.SOFT_TOKENS for policy, _ in configs}
    if len(soft) != 1:
        raise ValueError("soft-token and prompt-window policies need separate prefills")
    prompt_len = len(prompt_ids)
    device = model.device
    embeds = model.get_input_embeddings()(torch.tensor([list(prompt_ids)], device=device))
    first_policy = configs[0][0]
    if soft.pop():
        embeds = torch.cat([embeds, _soft_token_embeddings(model, first_policy)], dim=1)
        num_recorded = first_policy.num_observations
    else:
        num_recorded = max(_observation_count(policy, prompt_len) for policy, _ in configs)
    seq_len = embeds.shape[1]
    with _recording(num_recorded) as recorder:
        out, cache = _prefill(model, embeds, prompt_len)
    first_token = int(out.logits[0, -1].argmax())
    full_kv = [(layer.keys, layer.values) for layer in cache.layers]
    recorded = RecordedPrefill(
        recorder.queries, recorder.keys, prompt_len, model.model.layers[0].self_attn.scaling, len(cache.layers)
    )
    stop = _stop_ids(model, stop_token_ids)
    results = []
    for policy, budget in configs:
        for layer, (keys, values) in zip(cache.layers, full_kv):
            layer.keys, layer.values = keys, values
        keep = budget.keep_count(prompt_len)
        kept = None
        if keep < prompt_len:
            kept = [policy.select(recorded.score_inputs(policy, layer), keep) for layer in range(recorded.num_layers)]
            _compress_cache(cache, kept)
        elif seq_len > prompt_len:
            # no eviction: generate would not have appended the soft tokens at all
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :prompt_len], layer.values[:, :, :prompt_len]
        cache_lengths = [layer.keys.shape[2] for layer in cache.layers]
        tokens, positions = _greedy_decode(model, cache, first_token, prompt_len, max_new_tokens, stop)
        results.append(EvictionResult(tokens, prompt_len, kept, cache_lengths, positions))
    return results, recorded
