"""FLASHINFER with eviction (its own module: importing it needs the flashinfer package)."""

from __future__ import annotations

from vllm.v1.attention.backends.flashinfer import FlashInferBackend, FlashInferImpl

from .attention import EvictionImplMixin


class EvictionFlashInferImpl(EvictionImplMixin, FlashInferImpl):
    pass


class EvictionFlashInferBackend(FlashInferBackend):
    @staticmethod
    def get_impl_cls() -> type[FlashInferImpl]:
        return EvictionFlashInferImpl
