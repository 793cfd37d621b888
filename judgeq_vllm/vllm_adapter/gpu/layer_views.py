"""Per-layer attention lengths and KV slots for per-layer budgets (PyramidKV) on Model Runner V2.

NOTE on the design (docs/gpu-path-design.md §4.7). Blocks, ``S`` and the block-row shift
are shared by every layer, so vLLM's block table, our shifted attention rows and the
shared offsets (``offsets.apply_eviction_offsets``) stay as they are. What differs per
layer is where a token at ``p >= L'`` is written (``delta_l``) and how many rows attention
reads (``L' - k_l``). On a step whose batch holds a request compacted with per-layer counts
(a host check against ``nonuniform``, the host mirror of the plans), one more launch
(``offsets.apply_layer_eviction_offsets``) writes ``[L, max_num_reqs]`` lengths and
``[L, max_num_tokens]`` slots, and each layer's attention implementation reads its row:
its own ``seq_lens`` in ``forward``, its own slots in ``do_kv_cache_update``. Those two run
as Python only outside FULL CUDA graphs, which the runner never replays on such steps;
FA3's ahead-of-time schedule was computed from the shared (largest) lengths, so layers
drop it (``scheduler_metadata=None``: FA3 schedules from the lengths it is given).

Engines whose policy has no per-layer budgets never build this object.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from vllm.v1.worker.gpu.buffer_utils import StagedWriteTensor

from ..plan import EvictionPlan
from .offsets import apply_layer_eviction_offsets, keep_deficits


class LayerViews:
    """The per-layer buffers, their per-slot inputs and this step's views of them."""

    def __init__(self, num_layers: int, max_num_reqs: int, max_num_tokens: int, device: torch.device):
        # k - k_l per request slot, read by the kernel only where the slot has a plan
        self.keep_deficits = StagedWriteTensor((max_num_reqs, num_layers), dtype=torch.int32, device=device)
        # request slot -> deficits to write this step (one write per slot: apply_write
        # takes at most max_num_reqs rows)
        self._deficit_rows: dict[int, list[int]] = {}
        # host mirror: the slot's request was compacted with per-layer counts
        self.nonuniform = np.zeros(max_num_reqs, dtype=bool)
        # rows padded to 16 elements: every layer's row starts 16-byte aligned, as vLLM's own
        # buffers do (Triton specialises kernels on pointer alignment)
        self.seq_lens = torch.zeros(num_layers, _round_up(max_num_reqs), dtype=torch.int32, device=device)
        self.slot_mappings = torch.zeros(num_layers, _round_up(max_num_tokens), dtype=torch.int64, device=device)
        # set for the forward pass of a step that needs the views
        self.active = False
        # this step's per-layer rows, sliced once per length (slicing costs µs of CPU)
        self._seq_len_rows: tuple[int, tuple[torch.Tensor, ...]] | None = None
        self._slot_rows: tuple[int, tuple[torch.Tensor, ...]] | None = None

    # ---- per request ----------------------------------------------------------------

    def reset_slot(self, slot: int) -> None:
        self.nonuniform[slot] = False

    def set_plan(self, slot: int, plan: EvictionPlan) -> None:
        self._deficit_rows[slot] = keep_deficits(plan)
        self.nonuniform[slot] = not plan.uniform

    def apply_writes(self) -> None:
        if self._deficit_rows:
            for slot, row in self._deficit_rows.items():
                self.keep_deficits.stage_write(slot, 0, row)
            self.keep_deficits.apply_write()
            self._deficit_rows.clear()

    def batch_needs_views(self, req_ids, req_id_to_index: dict[str, int]) -> bool:
        """Whether a request of the batch reads a cache compacted with per-layer counts
        (decided before CUDA-graph dispatch: such a step must not replay FULL)."""
        nonuniform = self.nonuniform
        return any(nonuniform[req_id_to_index[req_id]] for req_id in req_ids)

    # ---- per step -------------------------------------------------------------------

    def compute(self, input_batch, plan_state: torch.Tensor, block_table: torch.Tensor, slot_mapping: torch.Tensor,
                block_size: int) -> None:
        """Writes every layer's lengths and slots for this step (after vLLM's slot mapping)."""
        apply_layer_eviction_offsets(
            input_batch.idx_mapping,
            input_batch.query_start_loc,
            input_batch.seq_lens,
            input_batch.positions,
            plan_state,
            self.keep_deficits.gpu,
            block_table,
            slot_mapping,
            self.seq_lens,
            self.slot_mappings,
            num_reqs=input_batch.num_reqs,
            num_reqs_padded=input_batch.num_reqs_after_padding,
            num_tokens=input_batch.num_tokens,
            num_tokens_padded=input_batch.num_tokens_after_padding,
            block_size=block_size,
        )
        self.active = True
        self._seq_len_rows = self._slot_rows = None

    def finish_step(self) -> None:
        self.active = False

    def layer_metadata(self, layer: int, attn_metadata):
        """``attn_metadata`` (shared by every layer) with ``layer``'s attention lengths."""
        num_reqs = attn_metadata.seq_lens.shape[0]
        if self._seq_len_rows is None or self._seq_len_rows[0] != num_reqs:
            self._seq_len_rows = (num_reqs, self.seq_lens[:, :num_reqs].unbind(0))
        metadata = copy.copy(attn_metadata)
        metadata.seq_lens = self._seq_len_rows[1][layer]
        # FA3's ahead-of-time schedule was built for the shared lengths: never reuse it
        # for other ones (FA3 schedules itself without it; Triton ignores the field)
        metadata.scheduler_metadata = None
        return metadata

    def layer_slot_mapping(self, layer: int, num_tokens: int) -> torch.Tensor:
        """``layer``'s slots for the ``num_tokens`` (padded) tokens vLLM's KV write covers."""
        if self._slot_rows is None or self._slot_rows[0] != num_tokens:
            self._slot_rows = (num_tokens, self.slot_mappings[:, :num_tokens].unbind(0))
        return self._slot_rows[1][layer]


def _round_up(count: int, multiple: int = 16) -> int:
    return -(-count // multiple) * multiple
