"""The CPU-specific worker side: vLLM's V1 CPU runner and the CPU_ATTN backend."""
