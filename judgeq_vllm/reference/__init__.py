"""HF transformers reference implementation of prefill eviction (the oracle)."""

from .hf import (
    ATTN_IMPLEMENTATION,
    AttentionRecorder,
    EvictionResult,
    RecordedPrefill,
    generate,
    generate_many,
    load_reference_model,
    record_attention,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionRecorder",
    "EvictionResult",
    "RecordedPrefill",
    "generate",
    "generate_many",
    "load_reference_model",
    "record_attention",
]
