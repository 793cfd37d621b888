"""HF transformers reference implementation of prefill eviction (the oracle)."""

from .hf import ATTN_IMPLEMENTATION, AttentionRecorder, EvictionResult, generate, load_reference_model, record_attention

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionRecorder",
    "EvictionResult",
    "generate",
    "load_reference_model",
    "record_attention",
]
