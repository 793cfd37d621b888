"""Attention backends with eviction: vLLM's FLASH_ATTN, TRITON_ATTN and FLASHINFER, plus
observation-query capture, scoring and selection after each layer's attention.

Only the implementation class changes (``get_impl_cls``); metadata builders, KV layout,
CUDA-graph support and the FA3 ahead-of-time schedule stay vLLM's. The physical view of
compacted requests (lengths, block rows, slots) is already in the metadata the builders
read (``offsets.py``). A layer's ``forward`` runs Python only outside FULL CUDA graphs,
which compaction steps never replay (the runner's dispatch guard).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from ..step import current_step
from .compaction import GPUCompactionStep


class EvictionImplMixin:
    """After vLLM's attention of a layer, selects the kept rows of the step's jobs."""

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
        output = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )
        step = current_step()
        # attn_metadata is None in the profile run
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
