"""Eviction on vLLM's GPU engine: Model Runner V2, FlashAttention 3 / Triton / FlashInfer
attention, CUDA graphs and async scheduling on (docs/gpu-path-design.md).

``offsets`` and ``selection`` need only torch and Triton (tested on CPU in the Triton
interpreter); ``compaction``, ``attention``, ``layer_views``, ``model_runner`` and
``worker`` import vLLM's GPU modules.
"""
