"""Model Runner V2 with eviction: per-slot plans, physical offsets, compaction steps.

NOTE on the buffers (docs/gpu-path-design.md §2-3). vLLM's own input buffers stay
logical: they drive the sampler, ``min_tokens``, seeds and prefill detection exactly as
without eviction. Attention and RoPE read two buffers of ours instead, ``attn_seq_lens``
and ``rope_positions``, handed to the model by :class:`EvictionModelState` both when
CUDA graphs are captured and on every step, so FULL decode graphs replay with them. On
steps where some request of the batch reads a compacted cache (or is compacted), one
Triton launch (``offsets.apply_eviction_offsets``) writes them and edits vLLM's slot
mapping, attention block table and logits indices in place; on other steps two copies do.

Per-request state is one ``plan_state`` row per MRV2 request slot, written on the
compaction step and reset when the slot gets a new request. Its rules are conditioned on
positions, so no per-step scheduler data is needed beyond the compaction jobs.

Per-layer budgets (PyramidKV) add per-layer attention lengths and slots on the steps
whose batch reads a cache compacted with per-layer counts (``layer_views.py``); such
steps, like compaction steps, never replay a FULL CUDA graph. Other policies build none
of it.

Decode-time eviction runs events after the forward of the steps the scheduler tags
(``gkv_events.py``); an event's layout becomes the request's plan row right after it ran,
so the same offsets kernel serves every later token. G-KV adds a query ring, filled
inside every graph mode by each layer's attention (``gkv_window.py``), and a global score
beside the KV cache; StreamingLLM's decode variant needs neither. Engines without a
decode-time policy build none of it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import vllm.v1.worker.gpu.model_runner as mrv2
from vllm.compilation.breakable_cudagraph import is_breakable_cudagraph_enabled
from vllm.config.compilation import CUDAGraphMode
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
import vllm.v1.worker.gpu.buffer_utils as buffer_utils
from vllm.v1.worker.gpu.buffer_utils import StagedWriteTensor
from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from ..config import EvictionConfig
from ..embedding import install_soft_token_embedding
from ..plan import EvictionPlan
from ..step import EVICTION_SECONDS_ATTR, GKVEventRecorder, KeptIndexRecorder, current_step, set_current_step
from .attention import PER_LAYER_IMPLS, EvictionImplMixin
from .compaction import GPUCompactionStep
from .gkv_events import GKVEventStep, GKVScores, build_event_jobs
from .gkv_window import GKVQueryRing
from .layer_views import LayerViews
from .offsets import NO_PLAN, PLAN_FIELDS, TOTAL_LEN, apply_eviction_offsets, plan_state_row
from .selection import build_jobs

SUPPORTED_BACKENDS = "FLASH_ATTN, TRITON_ATTN and FLASHINFER"
# the ops that must run as Python between PIECEWISE graph pieces for per-layer lengths and
# slots to be read at run time (vLLM's default splitting ops)
PER_LAYER_SPLITTING_OPS = ("vllm::unified_attention_with_output", "vllm::unified_kv_cache_update")


class EvictionModelState(DefaultModelState):
    """Hands our ``attn_seq_lens`` and ``rope_positions`` to attention and RoPE."""

    def __init__(self, runner: "EvictionGPUModelRunner", *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.rope_state is not None:
            raise ValueError("--kv-eviction supports 1-D RoPE models only (M-RoPE models are multimodal)")
        self.runner = runner

    def prepare_attn(self, input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups, kv_cache_config,
                     for_capture: bool = False):
        runner = self.runner
        num_reqs = input_batch.num_reqs_after_padding
        if for_capture or not runner.offsets_applied:
            runner.attn_seq_lens[:num_reqs].copy_(input_batch.seq_lens[:num_reqs])
        # the builders read seq_lens from the batch; the sampler later reads the logical ones
        logical_seq_lens = input_batch.seq_lens
        input_batch.seq_lens = runner.attn_seq_lens[:num_reqs]
        try:
            return super().prepare_attn(
                input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups, kv_cache_config,
                for_capture=for_capture,
            )
        finally:
            input_batch.seq_lens = logical_seq_lens

    def prepare_inputs(self, input_batch, req_states) -> dict:
        runner = self.runner
        num_tokens = input_batch.num_tokens_after_padding
        if not runner.offsets_applied:
            runner.rope_positions[:num_tokens].copy_(input_batch.positions[:num_tokens])
        runner.offsets_applied = False
        return {**super().prepare_inputs(input_batch, req_states), "positions": runner.rope_positions[:num_tokens]}

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict:
        return {**super().prepare_dummy_inputs(num_reqs, num_tokens), "positions": self.runner.rope_positions[:num_tokens]}


class EvictionGPUModelRunner(mrv2.GPUModelRunner):
    """MRV2's runner plus the eviction seams; see the module note."""

    def __init__(self, vllm_config, device: torch.device):
        super().__init__(vllm_config, device)
        config = EvictionConfig.from_additional_config(vllm_config.additional_config)
        assert config is not None, "EvictionGPUModelRunner is only built when eviction is on"
        # the prefill policy (None for G-KV alone)
        self.eviction_policy = config.build_policy()
        self.num_attention_layers = self.model_config.get_num_layers(self.parallel_config)
        # opt-in debug hooks (tests): record the kept indices of every compaction (syncs)
        self.kept_index_recorder: KeptIndexRecorder | None = None
        self.gkv_event_recorder: GKVEventRecorder | None = None
        self.gkv_policy = config.build_decode_policy()
        self.attn_seq_lens = torch.zeros(self.max_num_reqs, dtype=torch.int32, device=device)
        self.rope_positions = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=device)
        # G-KV writes plan rows twice per step (new requests before the forward, events
        # after it): twice vLLM's staging buffers (set by super().__init__ from the batches
        # in flight), so that a buffer is reused only as many steps later as with one write
        # per step
        concurrency = buffer_utils._DEFAULT_MAX_CONCURRENCY
        self.plan_state = StagedWriteTensor(
            (self.max_num_reqs, PLAN_FIELDS), dtype=torch.int32, device=device,
            max_concurrency=2 * concurrency if self.gkv_policy is not None else concurrency,
        )
        self.plan_state.gpu[:, TOTAL_LEN] = NO_PLAN
        # host mirror of plan_state[:, TOTAL_LEN]: which steps need the offsets kernel
        self.plan_total_len = np.full(self.max_num_reqs, NO_PLAN, dtype=np.int64)
        # request slot -> plan row to write this step (one write per slot: apply_write
        # takes at most max_num_reqs rows)
        self._plan_rows: dict[int, list[int]] = {}
        self._step_jobs: dict[str, EvictionPlan] = {}
        # set by prepare_attn when the offsets kernel wrote our buffers, read by the model state
        self.offsets_applied = False
        # the eviction work whose GPU time goes with the next sampled output
        self._timed_steps: list[GPUCompactionStep | GKVEventStep] = []
        # per-layer budgets only: per-layer lengths and slots, and whether this step reads them
        self.layer_views = (
            LayerViews(self.num_attention_layers, self.max_num_reqs, self.max_num_tokens, device)
            if self.eviction_policy is not None and self.eviction_policy.per_layer_budgets else None
        )
        self._layer_views_step = False
        # decode-time policies only: this step's events; for a policy that scores with
        # queries (G-KV) the query ring (allocated before vLLM profiles memory, so the KV
        # cache is sized around it), for one that carries scores the scores (with the KV cache)
        scores_with_queries = self.gkv_policy is not None and self.gkv_policy.window > 0
        self.gkv_ring = self._make_gkv_ring(device) if scores_with_queries else None
        self.gkv_scores: GKVScores | None = None
        self._gkv_scale = 1.0  # the attention layers' softmax scale, read at load
        self._gkv_jobs: dict = {}
        self._gkv_event_step: GKVEventStep | None = None

    def _make_gkv_ring(self, device: torch.device) -> GKVQueryRing:
        return GKVQueryRing(
            self.num_attention_layers, self.max_num_reqs, self.max_num_tokens, self.gkv_policy.window,
            self.gkv_policy.interval, self.model_config.get_num_attention_heads(self.parallel_config),
            self.model_config.get_head_size(), self.model_config.dtype, device,
        )

    def kv_cache_memory_share(self) -> float:
        """The part of the KV-cache memory the K|V rows get: G-KV's global scores take
        ``4 * H_kv`` bytes per token and layer beside them (docs/engine-design.md §6.3)."""
        if self.gkv_policy is None or not self.gkv_policy.carries_scores:
            return 1.0
        num_kv_heads = self.model_config.get_num_kv_heads(self.parallel_config)
        kv_bytes = 2 * num_kv_heads * self.model_config.get_head_size() * self.model_config.dtype.itemsize
        score_bytes = GKVScores.bytes_per_token(1, num_kv_heads)
        return kv_bytes / (kv_bytes + score_bytes)

    # ---- set-up -------------------------------------------------------------------

    def load_model(self, *args, **kwargs) -> None:
        original = mrv2.init_model_state
        mrv2.init_model_state = functools.partial(_init_eviction_model_state, self)
        try:
            super().load_model(*args, **kwargs)
        finally:
            mrv2.init_model_state = original
        install_soft_token_embedding(self.model, self.eviction_policy, self.vocab_size, self.model_config.dtype, self.device)
        self._check_attention_backends()
        if self.layer_views is not None:
            self._install_per_layer_impls()
        if self.gkv_ring is not None:
            self._install_query_ring()

    def _check_attention_backends(self) -> None:
        for name, layer in self.compilation_config.static_forward_context.items():
            if isinstance(layer, Attention) and not isinstance(layer.impl, EvictionImplMixin):
                raise ValueError(
                    f"--kv-eviction supports the {SUPPORTED_BACKENDS} attention backends; layer {name} uses "
                    f"{layer.attn_backend.get_name()}; pass --attention-backend FLASH_ATTN"
                )

    def _install_per_layer_impls(self) -> None:
        self._check_per_layer_graph_pieces()
        # a __class__ swap (state-free subclass): uniform policies keep vLLM's call path
        for name, layer in self.compilation_config.static_forward_context.items():
            if not isinstance(layer, Attention):
                continue
            per_layer_cls = PER_LAYER_IMPLS.get(type(layer.impl))
            if per_layer_cls is None:
                raise ValueError(
                    f"--kv-eviction {self.eviction_policy.name} has per-layer budgets, which need the FLASH_ATTN or "
                    f"TRITON_ATTN attention backend; layer {name} uses {layer.attn_backend.get_name()}; "
                    f"pass --attention-backend FLASH_ATTN"
                )
            layer.impl.__class__ = per_layer_cls
            layer.impl.layer_views = self.layer_views
            layer.impl.layer_index = extract_layer_index(name)

    def _install_query_ring(self) -> None:
        # instance attributes: engines without G-KV keep the class default (None)
        for name, layer in self.compilation_config.static_forward_context.items():
            if isinstance(layer, Attention):
                layer.impl.gkv_ring = self.gkv_ring
                layer.impl.layer_index = extract_layer_index(name)
                self._gkv_scale = layer.impl.scale

    def _check_per_layer_graph_pieces(self) -> None:
        # a graph that captured a layer's KV write or attention would replay the shared
        # slots and lengths: per-layer steps run PIECEWISE, so both must stay outside its pieces
        config = self.compilation_config
        if not config.cudagraph_mode.has_piecewise_cudagraphs():
            return
        missing = [op for op in PER_LAYER_SPLITTING_OPS if op not in (config.splitting_ops or ())]
        if missing or is_breakable_cudagraph_enabled():
            raise ValueError(
                f"--kv-eviction {self.eviction_policy.name} has per-layer budgets, whose steps run PIECEWISE CUDA "
                f"graphs with {', '.join(PER_LAYER_SPLITTING_OPS)} between the pieces (vLLM's default splitting ops, "
                f"without VLLM_USE_BREAKABLE_CUDAGRAPH); missing: {', '.join(missing) or 'none'}. Keep vLLM's "
                f"default splitting ops, or pass --compilation-config '{{\"cudagraph_mode\": \"FULL_DECODE_ONLY\"}}'"
            )

    def initialize_kv_cache(self, *args, **kwargs) -> None:
        super().initialize_kv_cache(*args, **kwargs)
        if self.block_tables.blocks_per_kv_block[0] != 1:
            raise ValueError(
                f"--kv-eviction needs the attention kernel's block size to equal the KV block size "
                f"({self.block_tables.kernel_block_sizes[0]} vs {self.block_tables.block_sizes[0]})"
            )
        self.kernel_block_size = self.block_tables.kernel_block_sizes[0]
        if self.gkv_policy is not None and self.gkv_policy.carries_scores:
            num_blocks, num_kv_heads, block_size, _ = self.kv_caches[0].shape
            self.gkv_scores = GKVScores(self.num_attention_layers, num_blocks * block_size, num_kv_heads, self.device)
        if self.cudagraph_manager is not None:
            self._guard_full_graphs_on_compaction_steps()

    def _guard_full_graphs_on_compaction_steps(self) -> None:
        # a FULL graph runs no Python attention, so no scoring and no per-layer lengths or
        # slots: such a step falls back to its PIECEWISE graph, or eager. G-KV event steps
        # replay FULL: their queries reach the ring inside the graph and their events run
        # after the forward (gkv_events.py)
        manager = self.cudagraph_manager
        dispatch = manager.dispatch

        def dispatch_without_full_compaction(num_reqs, num_tokens, uniform_token_count, num_active_loras=0):
            desc = dispatch(num_reqs, num_tokens, uniform_token_count, num_active_loras=num_active_loras)
            eviction_work = self._step_jobs or self._layer_views_step
            if not eviction_work or desc.cg_mode != CUDAGraphMode.FULL:
                return desc
            desc = dispatch(num_reqs, num_tokens, None, num_active_loras=num_active_loras)
            if desc.cg_mode == CUDAGraphMode.FULL:
                desc = BatchExecutionDescriptor(CUDAGraphMode.NONE, num_tokens, num_reqs, num_active_loras=num_active_loras)
            return desc

        manager.dispatch = dispatch_without_full_compaction

    def warm_up_eviction_kernels(self) -> None:
        """Compiles our Triton kernels before vLLM's JIT monitor starts watching."""
        from .warmup import warm_up_kernels

        warm_up_kernels(self)

    # ---- per step -----------------------------------------------------------------

    def add_requests(self, scheduler_output) -> None:
        super().add_requests(scheduler_output)
        for new_request in scheduler_output.scheduled_new_reqs:
            slot = self.req_states.req_id_to_index[new_request.req_id]
            self._plan_rows[slot] = [NO_PLAN] + [0] * (PLAN_FIELDS - 1)
            self.plan_total_len[slot] = NO_PLAN
            if self.layer_views is not None:
                self.layer_views.reset_slot(slot)
        if self.gkv_ring is not None:
            # first events of the requests admitted (or resumed) in this step; a request
            # missing from it is served without G-KV
            first_events = getattr(scheduler_output, "judgeq_gkv_first_events", None) or {}
            for new_request in scheduler_output.scheduled_new_reqs:
                slot = self.req_states.req_id_to_index[new_request.req_id]
                self.gkv_ring.set_slot(slot, first_events.get(new_request.req_id))

    def update_requests(self, scheduler_output) -> None:
        super().update_requests(scheduler_output)
        # warm-up passes SchedulerOutput.make_empty(), which has no eviction attributes
        self._step_jobs = getattr(scheduler_output, "judgeq_jobs", None) or {}
        for req_id, plan in self._step_jobs.items():
            slot = self.req_states.req_id_to_index[req_id]
            self._plan_rows[slot] = plan_state_row(plan)
            self.plan_total_len[slot] = plan.total_len
            if self.layer_views is not None:
                self.layer_views.set_plan(slot, plan)
        if self._plan_rows:
            for slot, row in self._plan_rows.items():
                self.plan_state.stage_write(slot, 0, row)
            self.plan_state.apply_write()
            self._plan_rows.clear()
        if self.gkv_ring is not None:
            self.gkv_ring.apply_writes()
        if self.gkv_policy is not None:
            # before dispatch (the guard reads it)
            self._gkv_jobs = getattr(scheduler_output, "judgeq_gkv_jobs", None) or {}
        if self.layer_views is not None:
            self.layer_views.apply_writes()
            # before dispatch (execute_model calls it after this method)
            self._layer_views_step = self.layer_views.batch_needs_views(
                scheduler_output.num_scheduled_tokens, self.req_states.req_id_to_index
            )

    def prepare_attn(self, input_batch):
        block_tables, slot_mappings = super().prepare_attn(input_batch)
        if self._step_jobs:
            set_current_step(self._compaction_step(input_batch))
        num_reqs = input_batch.num_reqs
        upper_seq_lens = input_batch.seq_lens_cpu_upper_bound[:num_reqs].numpy()
        if (upper_seq_lens >= self.plan_total_len[input_batch.idx_mapping_np]).any():
            apply_eviction_offsets(
                input_batch.idx_mapping,
                input_batch.query_start_loc,
                self.input_buffers.seq_lens,
                self.input_buffers.positions,
                self.plan_state.gpu,
                self.block_tables.block_tables[0].gpu,
                self.block_tables.input_block_tables[0],
                slot_mappings[0],
                input_batch.logits_indices,
                self.attn_seq_lens,
                self.rope_positions,
                num_reqs=num_reqs,
                num_reqs_padded=input_batch.num_reqs_after_padding,
                num_tokens=input_batch.num_tokens,
                num_tokens_padded=input_batch.num_tokens_after_padding,
                block_size=self.kernel_block_size,
            )
            self.offsets_applied = True
        if self._layer_views_step:
            self.layer_views.compute(
                input_batch, self.plan_state.gpu, self.block_tables.block_tables[0].gpu, slot_mappings[0],
                self.kernel_block_size,
            )
        if self.gkv_ring is not None:
            self.gkv_ring.compute_rows(input_batch)
        if self._gkv_jobs:
            self._gkv_event_step = self._gkv_events()
        return block_tables, slot_mappings

    def _gkv_events(self) -> GKVEventStep:
        req_ids = list(self._gkv_jobs)
        slots = [self.req_states.req_id_to_index[req_id] for req_id in req_ids]
        slot_index = torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)
        block_rows = self.block_tables.block_tables[0].gpu.index_select(0, slot_index)
        jobs = build_event_jobs(self._gkv_jobs, slots, block_rows, self.device)
        return GKVEventStep(jobs, self.gkv_policy, self.gkv_event_recorder)

    def _run_gkv_events(self, step: GKVEventStep) -> None:
        """The step's events, then their layouts as the requests' plan rows: the rows are
        position-conditioned (``p >= T_i``), so writing them now, after the forward whose
        tokens were still in the previous layout, serves every later token."""
        step.run(self.kv_caches, self.gkv_ring, self.gkv_scores, self._gkv_scale)
        for slot, job in zip(step.jobs.slots_host, step.jobs.jobs):
            self.plan_state.stage_write(slot, 0, plan_state_row(job.target))
            self.plan_total_len[slot] = job.target.total_len
        self.plan_state.apply_write()

    def _compaction_step(self, input_batch) -> GPUCompactionStep:
        batch_rows = {req_id: row for row, req_id in enumerate(input_batch.req_ids)}
        req_ids = list(self._step_jobs)
        plans = [self._step_jobs[req_id] for req_id in req_ids]
        query_ends = [int(input_batch.query_start_loc_np[batch_rows[req_id] + 1]) for req_id in req_ids]
        slots = torch.tensor([self.req_states.req_id_to_index[req_id] for req_id in req_ids], dtype=torch.int64)
        block_rows = self.block_tables.block_tables[0].gpu.index_select(0, slots.to(self.device, non_blocking=True))
        jobs = build_jobs(self.eviction_policy, req_ids, plans, query_ends, block_rows, self.device)
        return GPUCompactionStep(jobs, self.eviction_policy, self.num_attention_layers, self.kept_index_recorder)

    @torch.inference_mode()
    def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run: bool = False,
                      skip_attn_for_dummy_run: bool = False, is_profile: bool = False):
        if dummy_run and self.gkv_ring is not None:
            self.gkv_ring.reset_rows()
        try:
            output = super().execute_model(
                scheduler_output, intermediate_tensors, dummy_run, skip_attn_for_dummy_run, is_profile
            )
            step = current_step()
            # after every layer's attention and before sampling: the async output copy
            # waits for it, so the scheduler frees the head blocks after it ran
            if isinstance(step, GPUCompactionStep):
                step.compact()
                self._timed_steps.append(step)
            if self._gkv_event_step is not None:
                self._run_gkv_events(self._gkv_event_step)
                self._timed_steps.append(self._gkv_event_step)
            return output
        finally:
            set_current_step(None)
            self._step_jobs = {}
            self._gkv_jobs = {}
            self._gkv_event_step = None
            self.offsets_applied = False
            if self.layer_views is not None:
                self._layer_views_step = False
                self.layer_views.finish_step()

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        steps, self._timed_steps = self._timed_steps, []
        if not steps or output is None:
            return output
        # the events are read where the output reaches the host (the executor's
        # get_output, after the copy that follows the compaction): no sync here
        get_output = output.get_output

        def get_output_with_eviction_seconds():
            model_runner_output = get_output()
            setattr(model_runner_output, EVICTION_SECONDS_ATTR, sum(step.gpu_seconds() for step in steps))
            return model_runner_output

        output.get_output = get_output_with_eviction_seconds
        return output


def _init_eviction_model_state(runner: EvictionGPUModelRunner, vllm_config, model, encoder_cache, device):
    if hasattr(model, "get_model_state_cls"):
        raise ValueError(f"--kv-eviction does not support {type(model).__name__}: it brings its own model state")
    return EvictionModelState(runner, vllm_config, model, encoder_cache, device)
