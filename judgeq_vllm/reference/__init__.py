"""HF transformers reference implementations of prefill and decode-time (G-KV) eviction (the oracles)."""

from .gkv import GKVEviction, GKVResult, generate_gkv
from .hf import (
    ATTN_IMPLEMENTATION,
    AttentionRecorder,
    EvictedPrefill,
    EvictionResult,
    RecordedPrefill,
    evicting_prefill,
    generate,
    generate_many,
    load_reference_model,
    record_attention,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionRecorder",
    "EvictedPrefill",
    "EvictionResult",
    "GKVEviction",
    "GKVResult",
    "RecordedPrefill",
    "evicting_prefill",
    "generate",
    "generate_gkv",
    "generate_many",
    "load_reference_model",
    "record_attention",
]
