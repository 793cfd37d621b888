"""The CPU worker with eviction: installs the attention backend and the runner."""

from __future__ import annotations

import vllm.v1.worker.cpu_worker as cpu_worker_module
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.selector import _cached_get_attn_backend
from vllm.v1.worker.cpu_worker import CPUWorker

from .model_runner import EvictionCPUModelRunner

BACKEND_PATH = "judgeq_vllm.vllm_adapter.cpu.attention.EvictionCPUAttentionBackend"


def install_attention_backend() -> None:
    """Points ``CPU_ATTN`` at the eviction backend in this process.

    The CPU platform always picks ``CPU_ATTN``; the override stays for the life of the
    process, which matters only in-process (tests), where a later engine without
    eviction gets the same classes doing exactly what vLLM's do.
    """
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
    # backend selection is memoised per process; a previous engine may have filled it
    _cached_get_attn_backend.cache_clear()


class EvictionCPUWorker(CPUWorker):
    """``CPUWorker`` building :class:`EvictionCPUModelRunner` and the eviction backend."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_attention_backend()

    def init_device(self) -> None:
        # CPUWorker.init_device builds its runner inline from this module-level name
        original = cpu_worker_module.CPUModelRunner
        cpu_worker_module.CPUModelRunner = EvictionCPUModelRunner
        try:
            super().init_device()
        finally:
            cpu_worker_module.CPUModelRunner = original
