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
from ..step import CompactionJob, EvictionStep, KeptIndexRecorder, ShiftedRow, set_current_step, step_scope


class SoftTokenEmbedding(torch.nn.Module):
    """The model's input embedding, extended with the soft-token rows.

    Ids ``< vocab`` go to the wrapped embedding; id ``vocab + j`` gets soft row ``j``.
    The output head keeps the original weight (also when tied), so logits are unchanged.
    """

    def __init__(self, inner: torch.nn.Module, vocab_size: int, soft_rows: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.vocab_size = vocab_size
        self.register_buffer("soft_rows", soft_rows, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_soft = input_ids >= self.vocab_size
        base = self.inner(torch.where(is_soft, torch.zeros_like(input_ids), input_ids))
        soft_index = (input_ids - self.vocab_size).clamp(0, self.soft_rows.shape[0] - 1)
        return torch.where(is_soft[:, None], self.soft_rows[soft_index].to(base.dtype), base)


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

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        soft_tokens = getattr(self.eviction_policy, "soft_tokens", None)
        if soft_tokens is None:
            return
        language_model = getattr(self.model, "model", None)
        embedding = getattr(language_model, "embed_tokens", None)
        if embedding is None:
            raise ValueError(
                f"--kv-eviction judgeq: cannot find the input embedding (model.embed_tokens) of "
                f"{type(self.model).__name__}; use a query-window policy such as snapkv"
            )
        soft_rows = soft_tokens.embeddings.to(self.device, self.model_config.dtype)
        language_model.embed_tokens = SoftTokenEmbedding(embedding, self.model_config.get_vocab_size(), soft_rows)

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
        with step_scope():
            return super().execute_model(scheduler_output, intermediate_tensors)

    def _prepare_inputs(self, scheduler_output: SchedulerOutput, num_scheduled_tokens: np.ndarray):
        logits_indices, spec_decode_metadata = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        jobs, compacted = scheduler_output.judgeq_jobs, scheduler_output.judgeq_compacted
        if not jobs and not compacted:
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
            )
        )
        return logits_indices, spec_decode_metadata


def _slots(row_blocks: torch.Tensor, logical_slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """Physical KV slots of a request's logical slots, through its block-table row."""
    return row_blocks[logical_slots // block_size] * block_size + logical_slots % block_size
