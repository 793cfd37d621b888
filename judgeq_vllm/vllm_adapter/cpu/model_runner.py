"""vLLM's V1 CPU model runner with eviction: soft-token embeddings and per-request offsets.

NOTE on what stays logical. vLLM's own counters (``num_computed_tokens``, ``seq_lens``,
``num_prompt_tokens``) keep counting soft tokens and evicted rows; they drive the
discard mask, prefill detection and the sampler, which therefore behave as without
eviction. Only three things become physical, and only for requests that read a
compacted cache (``judgeq_compacted`` on the scheduler output): the RoPE position
(``p - n_soft``), the KV slot (``p - delta``) and, in the attention builder, the
sequence length and block row. On the compaction step itself the first token's logits
are taken from the last real prompt token instead of the last soft token.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from ..config import EvictionConfig
from ..embedding import install_soft_token_embedding
from ..step import (
    EVICTION_SECONDS_ATTR,
    CompactionJob,
    EvictionStep,
    GKVEventRecorder,
    GKVStepJob,
    GKVWorkerState,
    KeptIndexRecorder,
    QueryCapture,
    ShiftedRow,
    current_step,
    set_current_step,
    step_scope,
)


class EvictionCPUModelRunner(CPUModelRunner):
    """``CPUModelRunner`` plus the eviction seams; see the module note."""

    def __init__(self, vllm_config, device: torch.device):
        super().__init__(vllm_config, device)
        config = EvictionConfig.from_additional_config(vllm_config.additional_config)
        assert config is not None, "EvictionCPUModelRunner is only built when eviction is on"
        self.eviction_policy = config.build_policy()
        self.num_attention_layers = self.model_config.get_num_layers(self.parallel_config)
        # opt-in debug hook (tests): records the kept indices of every compaction
        self.kept_index_recorder: KeptIndexRecorder | None = None
        self.gkv_event_recorder: GKVEventRecorder | None = None
        decode_policy = config.build_decode_policy()
        self.gkv_state = GKVWorkerState(decode_policy, self.num_attention_layers) if decode_policy else None
        # compaction time of the last forward pass, until sample_tokens reports it
        self._eviction_seconds: float | None = None

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        install_soft_token_embedding(
            self.model, self.eviction_policy, self.model_config.get_vocab_size(), self.model_config.dtype, self.device
        )

    def initialize_kv_cache(self, *args, **kwargs) -> None:
        super().initialize_kv_cache(*args, **kwargs)
        self._exclude_soft_ids_from_penalties()

    def _exclude_soft_ids_from_penalties(self) -> None:
        # the penalties count prompt ids into vocab_size + 1 bins, the last being padding;
        # soft ids (>= vocab) become padding instead of indexing out of range
        input_batch = self.input_batch
        make_prompt_ids = input_batch._make_prompt_token_ids_cpu_tensor

        def prompt_ids_without_soft_tokens() -> torch.Tensor:
            return make_prompt_ids().clamp_(max=input_batch.vocab_size)

        input_batch._make_prompt_token_ids_cpu_tensor = prompt_ids_without_soft_tokens

    def execute_model(self, scheduler_output: SchedulerOutput, intermediate_tensors=None):
        if self.gkv_state is not None:
            # a window whose event never ran (the request ended or was aborted first)
            self.gkv_state.drop(scheduler_output.finished_req_ids)
        with step_scope():
            output = super().execute_model(scheduler_output, intermediate_tensors)
            step = current_step()
            compacted = step is not None and (step.jobs or step.gkv_jobs)
            self._eviction_seconds = step.timer.seconds if compacted else None
            return output

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        if self._eviction_seconds is not None:
            setattr(output, EVICTION_SECONDS_ATTR, self._eviction_seconds)
            self._eviction_seconds = None
        return output

    def _prepare_inputs(self, scheduler_output: SchedulerOutput, num_scheduled_tokens: np.ndarray):
        logits_indices, spec_decode_metadata = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        jobs, compacted = scheduler_output.judgeq_jobs, scheduler_output.judgeq_compacted
        gkv_jobs = getattr(scheduler_output, "judgeq_gkv_jobs", {})
        gkv_captures = getattr(scheduler_output, "judgeq_gkv_captures", {})
        if not jobs and not compacted and not gkv_jobs and not gkv_captures:
            set_current_step(None)
            return logits_indices, spec_decode_metadata
        block_table = self.input_batch.block_table.block_tables[0]
        block_size = block_table.block_size
        block_rows = block_table.block_table.cpu
        # on CPU the "device" buffers alias these, and both KV writes read this slot buffer
        slot_mapping = block_table.slot_mapping.cpu
        query_start_loc = self.query_start_loc.cpu
        jobs_of_step, shifted_rows, per_layer_rows = [], [], []
        for req_id, plan in jobs.items():
            row = self.input_batch.req_id_to_index[req_id]
            logits_indices[row] -= plan.num_soft
            jobs_of_step.append(CompactionJob(req_id, row, plan, block_rows[row].long()))
        for req_id, plan in compacted.items():
            row = self.input_batch.req_id_to_index[req_id]
            start, end = int(query_start_loc[row]), int(query_start_loc[row + 1])
            positions = self.positions[start:end]
            assert int(positions[0]) >= plan.total_len, f"request {req_id} mixes prompt and compacted tokens"
            # slots from the logical positions first, then the RoPE positions
            row_blocks = block_rows[row].long()
            slot_mapping[start:end] = _slots(row_blocks, positions - plan.slot_shift, block_size)
            if not plan.uniform:
                per_layer_rows.append((plan, start, end, row_blocks, positions.clone()))
            positions -= plan.num_soft
            shifted_rows.append(ShiftedRow(row, plan))
        gkv_jobs_of_step = [
            GKVStepJob(req_id, job, block_rows[self.input_batch.req_id_to_index[req_id]].long())
            for req_id, job in gkv_jobs.items()
        ]
        captures = [
            QueryCapture(req_id, int(query_start_loc[self.input_batch.req_id_to_index[req_id]]) + capture.first_token,
                         capture.window_offset, capture.count)
            for req_id, capture in gkv_captures.items()
        ]
        layer_slot_mappings = None
        if per_layer_rows:
            layer_slot_mappings = []
            for layer in range(self.num_attention_layers):
                layer_slots = slot_mapping.clone()
                for plan, start, end, row_blocks, positions in per_layer_rows:
                    layer_slots[start:end] = _slots(row_blocks, positions - plan.layer_slot_shift(layer), block_size)
                layer_slot_mappings.append(layer_slots)
        set_current_step(
            EvictionStep(
                jobs=jobs_of_step,
                shifted_rows=shifted_rows,
                policy=self.eviction_policy,
                num_layers=self.num_attention_layers,
                recorder=self.kept_index_recorder,
                layer_slot_mappings=layer_slot_mappings,
                gkv_jobs=gkv_jobs_of_step,
                gkv_captures=captures,
                gkv_state=self.gkv_state,
                gkv_recorder=self.gkv_event_recorder,
            )
        )
        return logits_indices, spec_decode_metadata


def _slots(row_blocks: torch.Tensor, logical_slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """Physical KV slots of a request's logical slots, through its block-table row."""
    return row_blocks[logical_slots // block_size] * block_size + logical_slots % block_size
