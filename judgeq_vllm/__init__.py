"""judgeq-vllm: KV-cache eviction for vLLM 0.26 (Judge Q soft-token queries and baselines).

Import layering, one way only: ``policies`` (pure torch) <- ``kernels`` <- ``reference``
(HF transformers oracle) / ``vllm_adapter`` (the only package that imports vLLM).
"""

__version__ = "0.1.0"
