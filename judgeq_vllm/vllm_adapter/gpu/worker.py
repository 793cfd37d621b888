"""The GPU worker with eviction: installs the attention backends and Model Runner V2's subclass."""

from __future__ import annotations

import vllm.v1.worker.gpu.model_runner as mrv2
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.selector import _cached_get_attn_backend
from vllm.v1.worker.gpu_worker import Worker

from .model_runner import EvictionGPUModelRunner

BACKEND_PATHS = {
    AttentionBackendEnum.FLASH_ATTN: "judgeq_vllm.vllm_adapter.gpu.attention.EvictionFlashAttentionBackend",
    AttentionBackendEnum.TRITON_ATTN: "judgeq_vllm.vllm_adapter.gpu.attention.EvictionTritonAttentionBackend",
    AttentionBackendEnum.FLASHINFER: "judgeq_vllm.vllm_adapter.gpu.attention_flashinfer.EvictionFlashInferBackend",
}


def install_attention_backends() -> None:
    """Points the three supported backends at their eviction subclasses in this process
    (classes are resolved lazily: FlashInfer's module is imported only if selected)."""
    for backend, path in BACKEND_PATHS.items():
        register_backend(backend, path)
    # backend selection is memoised per process; a previous engine may have filled it
    _cached_get_attn_backend.cache_clear()


class EvictionGPUWorker(Worker):
    """vLLM's GPU worker building :class:`EvictionGPUModelRunner` (Model Runner V2 only)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.use_v2_model_runner:
            raise ValueError(
                "--kv-eviction needs vLLM's Model Runner V2 on GPU; unset VLLM_USE_V2_MODEL_RUNNER=0 "
                "and turn off the features that force the V1 runner (see the log)"
            )
        install_attention_backends()

    def init_device(self) -> None:
        # Worker.init_device imports the V2 runner class from this module at call time
        original = mrv2.GPUModelRunner
        mrv2.GPUModelRunner = EvictionGPUModelRunner
        try:
            super().init_device()
        finally:
            mrv2.GPUModelRunner = original

    def determine_available_memory(self) -> int:
        # G-KV keeps a global score beside every KV row: the blocks are sized so that both fit
        available = super().determine_available_memory()
        return int(available * self.model_runner.kv_cache_memory_share())

    def compile_or_warm_up_model(self):
        self.model_runner.warm_up_eviction_kernels()
        return super().compile_or_warm_up_model()
