"""Attention backends with eviction: vLLM's FLASH_ATTN, TRITON_ATTN and FLASHINFER, plus
observation-query capture, scoring and selection after each layer's attention.

Only the implementation class changes (``get_impl_cls``); metadata builders, KV layout,
CUDA-graph support and the FA3 ahead-of-time schedule stay vLLM's. The physical view of
compacted requests (lengths, block rows, slots) is already in the metadata the builders
read (``offsets.py``). A layer's ``forward`` runs Python only outside FULL CUDA graphs,
which compaction steps never replay (the runner's dispatch guard).

Per-layer budgets (PyramidKV): the runner turns each layer's implementation into its
``PerLayer*`` subclass (``PER_LAYER_IMPLS``), which reads the layer's own attention
lengths and KV slots on the steps that need them (``layer_views.py``). Engines whose
policy has uniform budgets keep the classes above, unchanged.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from ..step import current_step
from .compaction import GPUCompactionStep
from .gkv_window import GKVQueryRing


class EvictionImplMixin:
    """After vLLM's attention of a layer, selects the kept rows of the step's jobs; with
    G-KV, also copies the layer's queries into the runner's query ring, a device-side copy
    that CUDA graphs record (``gkv_window.py``).

    Attributes (set by the runner on G-KV engines only):
        gkv_ring: the runner's query ring.
        layer_index: this layer's index in it.
    """

    gkv_ring: GKVQueryRing | None = None
    layer_index: int = 0

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # attn_metadata is None in the profile run
        if self.gkv_ring is not None and attn_metadata is not None:
            self.gkv_ring.capture(self.layer_index, query)
        output = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )
        step = current_step()
        if attn_metadata is not None and isinstance(step, GPUCompactionStep):
            step.select_layer(extract_layer_index(layer.layer_name), query, kv_cache, self.scale)
        return output


class EvictionFlashAttentionImpl(EvictionImplMixin, FlashAttentionImpl):
    pass


class EvictionFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[FlashAttentionImpl]:
        return EvictionFlashAttentionImpl


class EvictionTritonAttentionImpl(EvictionImplMixin, TritonAttentionImpl):
    pass


class EvictionTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TritonAttentionImpl]:
        return EvictionTritonAttentionImpl


class PerLayerViewsImplMixin:
    """Reads this layer's attention lengths (``forward``) and KV slots (the KV write) from
    the runner's :class:`~.layer_views.LayerViews` on steps where they differ by layer.

    Attributes (set by the runner when it swaps the class in):
        layer_views: the runner's per-layer buffers.
        layer_index: this layer's index in them.
    """

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.layer_views.active and attn_metadata is not None:
            attn_metadata = self.layer_views.layer_metadata(self.layer_index, attn_metadata)
        return super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if self.layer_views.active:
            slot_mapping = self.layer_views.layer_slot_mapping(self.layer_index, slot_mapping.shape[0])
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)


class PerLayerFlashAttentionImpl(PerLayerViewsImplMixin, EvictionFlashAttentionImpl):
    pass


class PerLayerTritonAttentionImpl(PerLayerViewsImplMixin, EvictionTritonAttentionImpl):
    pass


# FLASHINFER plans attention on the host from one set of lengths per step: per-layer
# lengths would need a plan per layer, so it has no per-layer class (refused)
PER_LAYER_IMPLS: dict[type, type] = {
    EvictionFlashAttentionImpl: PerLayerFlashAttentionImpl,
    EvictionTritonAttentionImpl: PerLayerTritonAttentionImpl,
}
