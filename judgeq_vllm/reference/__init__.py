"""HF transformers reference implementation of prefill eviction (the oracle)."""

from .hf import ATTN_IMPLEMENTATION, EvictionResult, generate, load_reference_model

__all__ = ["ATTN_IMPLEMENTATION", "EvictionResult", "generate", "load_reference_model"]
