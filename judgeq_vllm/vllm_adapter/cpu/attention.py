"""CPU_ATTN with eviction: a compacted request's attention view, and the compaction itself.

Installed over vLLM's ``CPU_ATTN`` only by the eviction worker (the CPU platform ignores
``--attention-backend`` and always returns ``CPU_ATTN``'s class). With no eviction work in
the step (``current_step() is None``) every method is vLLM's own.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from ...policies import ScoreInputs
from ..step import CompactionJob, EvictionStep, GKVStepJob, current_step
from .kv_layout import packed_tile_layout, read_rows, split_kv_cache, write_rows


@dataclasses.dataclass
class PerLayerCPUAttentionMetadata(CPUAttentionMetadata):
    """Layer 0's metadata, carrying every layer's own (per-layer budgets: each layer of a
    compacted request reads its own number of rows and writes to its own slots)."""

    layers: list[CPUAttentionMetadata] = dataclasses.field(default_factory=list)


class EvictionCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Gives compacted requests their physical view: shorter sequence, shifted block row."""

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False) -> CPUAttentionMetadata:
        step = current_step()
        if step is None or not step.shifted_rows:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        common = common_attn_metadata
        # a copy: block_table_tensor is the runner's master table on CPU
        block_table = common.block_table_tensor.clone()
        width = block_table.shape[1]
        for shifted in step.shifted_rows:
            first_block = shifted.plan.freed_blocks
            block_table[shifted.row, : width - first_block] = common.block_table_tensor[shifted.row, first_block:]
        common = dataclasses.replace(common, block_table_tensor=block_table)
        if step.layer_slot_mappings is None:
            return super().build(common_prefix_len, self._layer_view(common, step, 0), fast_build)
        layers = [
            super(EvictionCPUMetadataBuilder, self).build(common_prefix_len, self._layer_view(common, step, layer), fast_build)
            for layer in range(step.num_layers)
        ]
        first = {field.name: getattr(layers[0], field.name) for field in dataclasses.fields(CPUAttentionMetadata)}
        return PerLayerCPUAttentionMetadata(**first, layers=layers)

    @staticmethod
    def _layer_view(common, step: EvictionStep, layer: int):
        seq_lens = common.seq_lens.clone()
        for shifted in step.shifted_rows:
            seq_lens[shifted.row] -= shifted.plan.layer_evicted_len(layer)
        if step.layer_slot_mappings is None:
            return dataclasses.replace(common, seq_lens=seq_lens)
        slot_mapping = step.layer_slot_mappings[layer][: common.slot_mapping.shape[0]]
        return dataclasses.replace(common, seq_lens=seq_lens, slot_mapping=slot_mapping)


class EvictionCPUAttentionImpl(CPUAttentionBackendImpl):
    """After a layer's attention, compacts the prompts that end in this step, keeps the
    query rows of G-KV windows, and runs the decode-time events that end in this step."""

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CPUAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(attn_metadata, PerLayerCPUAttentionMetadata):
            attn_metadata = attn_metadata.layers[extract_layer_index(layer.layer_name)]
        output = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )
        step = current_step()
        # attn_metadata is None during warm-up; the step's KV is already in the cache and
        # no later token of these requests has passed this layer yet
        if attn_metadata is not None and step is not None and (step.jobs or step.gkv_jobs or step.gkv_captures):
            started = time.perf_counter()
            layer_idx = extract_layer_index(layer.layer_name)
            for job in step.jobs:
                self._compact(job, step, layer, layer_idx, query, kv_cache, attn_metadata)
            # captures first: an event's window ends with the rows of its own step
            for capture in step.gkv_captures:
                rows = query[capture.first_token : capture.first_token + capture.count]
                step.gkv_state.capture(capture.req_id, layer_idx, rows, capture.window_offset)
            for gkv_job in step.gkv_jobs:
                self._compact_gkv(gkv_job, step, layer, layer_idx, kv_cache)
            step.timer.seconds += time.perf_counter() - started
        return output

    def do_kv_cache_update(
        self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        step = current_step()
        if step is not None and step.layer_slot_mappings is not None:
            layer_slots = step.layer_slot_mappings[extract_layer_index(layer.layer_name)]
            slot_mapping = layer_slots[: slot_mapping.shape[0]]
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def _compact(
        self,
        job: CompactionJob,
        step: EvictionStep,
        layer,
        layer_idx: int,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CPUAttentionMetadata,
    ) -> None:
        plan = job.plan
        key_cache, value_cache = split_kv_cache(kv_cache)
        block_size, head_dim = kv_cache.shape[2], key_cache.shape[-1]
        layout = packed_tile_layout(self.isa, kv_cache.dtype, block_size, head_dim)
        keys = read_rows(key_cache, job.block_ids, plan.total_len, layout.key_map)
        query_end = int(attn_metadata.query_start_loc[job.row + 1])
        inputs = ScoreInputs(
            queries=query[query_end - plan.num_observations : query_end],
            keys=keys,
            num_candidates=plan.prompt_len,
            scale=self.scale,
            layer_idx=layer_idx,
            num_layers=step.num_layers,
        )
        kept = step.policy.select(inputs, plan.budget_keep)  # [num_kv_heads, k_l]
        keep = plan.layer_keeps[layer_idx]
        assert kept.shape[1] == keep, f"layer {layer_idx} kept {kept.shape[1]} rows, the plan {keep}"
        if step.recorder is not None:
            step.recorder.record(job.req_id, layer_idx, kept)
        values = read_rows(value_cache, job.block_ids, plan.total_len, layout.value_map)
        index = kept[:, :, None].expand(-1, -1, head_dim)
        # gathered copies, [k, num_kv_heads, head_dim]: sources and destinations overlap
        kept_keys = keys.gather(1, index).transpose(0, 1).contiguous()
        kept_values = values.gather(1, index).transpose(0, 1).contiguous()
        logical = plan.first_kept_slot + torch.arange(keep)
        slots = job.block_ids[logical // block_size] * block_size + logical % block_size
        write_rows(
            kept_keys, kept_values, key_cache, value_cache, slots, self.isa,
            layer._k_scale_float, layer._v_scale_float, self.kv_cache_dtype,
        )


    def _compact_gkv(self, step_job: GKVStepJob, step: EvictionStep, layer, layer_idx: int, kv_cache: torch.Tensor) -> None:
        """One decode-time event in one layer: selects among the resident rows ``[source_start,
        source_end)`` (G-KV scores them with the request's query window and its previous
        global scores; StreamingLLM needs neither) and moves the kept rows, and G-KV's
        scores, to ``[S_i, S_i + b)``."""
        job, state, policy = step_job.job, step.gkv_state, step.gkv_state.policy
        key_cache, value_cache = split_kv_cache(kv_cache)
        block_size, head_dim = kv_cache.shape[2], key_cache.shape[-1]
        num_kv_heads = key_cache.shape[1]
        layout = packed_tile_layout(self.isa, kv_cache.dtype, block_size, head_dim)
        # source_start is block aligned: the rows start at a block of the row
        source_blocks = step_job.block_ids[job.source_start // block_size :]
        num_rows = job.source_end - job.source_start
        keys = read_rows(key_cache, source_blocks, num_rows, layout.key_map)
        budget, window = job.target.keep, policy.window
        # G-KV's running scores beside the cache (none for a policy that carries no score)
        scores = None
        if policy.carries_scores:
            scores = state.layer_scores(layer_idx, kv_cache.shape[0] * block_size, num_kv_heads)
        previous = None
        if scores is not None and job.has_previous_scores:
            previous = scores[_slots(step_job.block_ids, job.source_start + torch.arange(budget - window), block_size)].T
        queries = state.windows[step_job.req_id][layer_idx] if window else None
        compression = policy.compress(queries, keys, self.scale, budget, previous)
        kept = compression.kept
        if step.gkv_recorder is not None:
            step.gkv_recorder.record(step_job.req_id, job.event, layer_idx, kept)
        values = read_rows(value_cache, source_blocks, num_rows, layout.value_map)
        index = kept[:, :, None].expand(-1, -1, head_dim)
        kept_keys = keys.gather(1, index).transpose(0, 1).contiguous()
        kept_values = values.gather(1, index).transpose(0, 1).contiguous()
        slots = _slots(step_job.block_ids, job.target.first_kept_slot + torch.arange(budget), block_size)
        write_rows(
            kept_keys, kept_values, key_cache, value_cache, slots, self.isa,
            layer._k_scale_float, layer._v_scale_float, self.kv_cache_dtype,
        )
        if scores is not None:
            # the scored rows come first in `kept` (ascending, the window rows last)
            scores[slots[: budget - window]] = compression.global_scores.T
        if window and layer_idx == state.num_layers - 1:
            state.windows.pop(step_job.req_id)


def _slots(block_ids: torch.Tensor, logical_slots: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_ids[logical_slots // block_size] * block_size + logical_slots % block_size


class EvictionCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` (same name, same KV layout) with the two classes above."""

    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return EvictionCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[CPUAttentionMetadataBuilder]:
        return EvictionCPUMetadataBuilder
