"""The eviction work of one GPU forward pass: score and select per layer, compact once.

The runner makes a :class:`GPUCompactionStep` current (``step.set_current_step``) for a
step whose chunks end some prompts; each attention layer's ``forward`` calls
:meth:`GPUCompactionStep.select_layer` after vLLM's attention (the step's KV is in the
cache by then), and the runner calls :meth:`GPUCompactionStep.compact` once the whole
forward has been enqueued: one ``compact_paged`` launch moves every layer's kept rows.
All of it runs on the model's stream, without host syncs. CUDA events around each piece
of work give the step's eviction time on the GPU, read once the step's output is copied
(:meth:`GPUCompactionStep.gpu_seconds`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ...kernels import compact_paged
from ...policies import EvictionPolicy
from ..step import KeptIndexRecorder
from .selection import CompactionJobs, score_layer, select_kept


@dataclass
class GPUCompactionStep:
    """Jobs of one step and what the layers have selected so far.

    Attributes:
        jobs: the requests whose prompt ends in this step.
        policy: the engine's eviction policy.
        num_layers: attention layers of the model.
        recorder: where kept indices go, if a test asked for them (syncs: tests only).
        kept: per layer, ``[J, num_kv_heads, max_keep]`` kept indices, once selected.
        caches: per layer, the layer's KV cache, once seen.
        events: (start, end) CUDA events around each layer's selection and the compaction.
    """

    jobs: CompactionJobs
    policy: EvictionPolicy
    num_layers: int
    recorder: KeptIndexRecorder | None = None
    kept: list[torch.Tensor | None] = field(default_factory=list)
    caches: list[torch.Tensor | None] = field(default_factory=list)
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kept = [None] * self.num_layers
        self.caches = [None] * self.num_layers

    def select_layer(self, layer_idx: int, query: torch.Tensor, kv_cache: torch.Tensor, scale: float) -> None:
        with self._timed():
            kept = select_kept(score_layer(self.policy, self.jobs, query, kv_cache, scale), self.jobs, layer_idx)
        self.kept[layer_idx] = kept
        self.caches[layer_idx] = kv_cache
        if self.recorder is not None:
            for j, (req_id, plan) in enumerate(zip(self.jobs.req_ids, self.jobs.plans)):
                self.recorder.record(req_id, layer_idx, kept[j, :, : plan.layer_keeps[layer_idx]].cpu())

    def compact(self) -> None:
        """Moves every layer's kept rows to ``[S, S + k_l)`` of each job's blocks (one launch)."""
        missing = [layer for layer, kept in enumerate(self.kept) if kept is None]
        # a step replayed as a FULL CUDA graph runs no Python attention: the dispatch
        # guard must have prevented that, and compacting half the layers would corrupt them
        assert not missing, f"compaction step: layers {missing[:8]} selected nothing"
        with self._timed():
            compact_paged(
                self.caches, self.jobs.block_rows, torch.stack(self.kept), self.jobs.num_kept,
                dest_start=self.jobs.dest_start,
            )

    def gpu_seconds(self) -> float:
        """GPU time of the step's scoring, selection and compaction; waits for the last event
        (done already once the step's sampled tokens have reached the host)."""
        self.events[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self.events) / 1e3

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events.append((start, end))
