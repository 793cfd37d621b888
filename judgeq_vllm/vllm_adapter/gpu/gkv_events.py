"""The decode-time events of one step on Model Runner V2: select (G-KV: score, carry
``F``), compact.

NOTE on the order (docs/engine-design.md §6.6). An event at ``T`` runs at the end of the
step whose tokens end at ``T``, after the whole forward: every layer has attended over
the uncompacted rows and copied its window queries into the ring (``gkv_window.py``) by
then. Per layer it gathers the resident keys ``[S_{i-1}, T - delta_{i-1})`` from the
paged cache, the previous global scores ``F`` at the first ``b - w`` of them, and selects
(``gkv_scoring.select_gkv``, batched over the step's events); the new ``F`` of the scored
kept rows goes to the physical slots of ``[S_i, S_i + b - w)``, where compaction puts
those rows. Then one ``compact_paged`` launch moves every layer's kept K|V rows to
``[S_i, S_i + b)`` (it handles both directions of overlap). All on the model's stream,
no host sync.

StreamingLLM's decode variant (``streamingllm-decode``) reads no keys, no ring and no
``F``: its kept rows, the sinks and the last ``b - sinks`` resident rows in every layer
and head, follow from the resident counts alone (``StreamingLLMDecodePolicy.kept_rows``,
which its CPU path uses too); the compaction is the same launch.

``F`` lives beside the KV cache: ``[L, num_blocks * bs, H_kv]`` fp32 indexed by physical
slot, read only where the request's own previous event wrote it, so freeing blocks frees
its scores too and nothing per request outlives the request (§6.3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ...kernels import compact_paged
from ...policies import DecodePolicy, StreamingLLMDecodePolicy
from ..decode_plan import GKVJob
from ..step import GKVEventRecorder
from .gkv_scoring import GKVSelection, jobs_per_chunk, select_gkv
from .gkv_window import GKVQueryRing


class GKVScores:
    """The running global score ``F`` of every layer, by physical KV slot."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, device: torch.device):
        self.scores = torch.zeros(num_layers, num_slots, num_kv_heads, dtype=torch.float32, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int) -> int:
        return num_layers * num_kv_heads * 4

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """``[J, H, m]`` scores at physical ``slots`` ``[J, m]``."""
        return self.scores[layer][slots].transpose(1, 2)

    def write(self, layer: int, slots: torch.Tensor, scores: torch.Tensor) -> None:
        """Stores ``scores`` ``[J, H, m]`` at physical ``slots`` ``[J, m]``."""
        self.scores[layer][slots] = scores.transpose(1, 2)


@dataclass(frozen=True)
class GKVEventJobs:
    """The events of one step, as device tensors (built once per step, from the jobs).

    Attributes:
        req_ids / jobs: the events, in the order of every tensor below.
        slots_host: their request slots.
        slots: [J] int64 request slots (their query windows in the ring).
        block_rows: [J, max_blocks] int32 block-table rows.
        source_start: [J] int64 first resident logical slot ``S_{i-1}`` (0 if uncompacted).
        num_rows: [J] int64 resident rows.
        has_previous: [J] bool, whether ``F`` of an earlier event sits at the first rows.
        dest_start: [J] int32 ``S_i``.
        budget: ``b``, rows kept per (layer, kv head).
        max_rows: the most resident rows of any event (host value: the padded width).
    """

    req_ids: list[str]
    jobs: list[GKVJob]
    slots_host: list[int]
    slots: torch.Tensor
    block_rows: torch.Tensor
    source_start: torch.Tensor
    num_rows: torch.Tensor
    has_previous: torch.Tensor
    dest_start: torch.Tensor
    budget: int
    max_rows: int

    @property
    def num_kept(self) -> torch.Tensor:
        """[J] ``compact_paged``'s kept count (``b`` for every event)."""
        return torch.full_like(self.num_rows, self.budget)


def build_event_jobs(
    jobs: dict[str, GKVJob], slots: list[int], block_rows: torch.Tensor, device: torch.device
) -> GKVEventJobs:
    """The step's events in a few small host-to-device copies (``block_rows`` is on device)."""
    events = list(jobs.values())
    budgets = {job.target.keep for job in events}
    assert len(budgets) == 1, f"G-KV events of one engine keep one budget, got {budgets}"

    def to_device(values, dtype) -> torch.Tensor:
        host = torch.as_tensor(np.asarray(values), dtype=dtype)
        if device.type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    num_rows = [job.source_end - job.source_start for job in events]
    return GKVEventJobs(
        req_ids=list(jobs),
        jobs=events,
        slots_host=list(slots),
        slots=to_device(slots, torch.int64),
        block_rows=block_rows,
        source_start=to_device([job.source_start for job in events], torch.int64),
        num_rows=to_device(num_rows, torch.int64),
        has_previous=to_device([job.has_previous_scores for job in events], torch.bool),
        dest_start=to_device([job.target.first_kept_slot for job in events], torch.int32),
        budget=budgets.pop(),
        max_rows=max(num_rows),
    )


@dataclass
class GKVEventStep:
    """Runs one step's events after its forward (see the module note).

    Attributes:
        jobs: the step's events.
        policy: the decode-time policy (G-KV's knobs, or StreamingLLM's decode variant).
        recorder: where kept rows go, if a test asked for them (syncs: tests only).
        events: (start, end) CUDA events around the work, for its GPU time.
    """

    jobs: GKVEventJobs
    policy: DecodePolicy
    recorder: GKVEventRecorder | None = None
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def run(self, kv_caches: list[torch.Tensor], ring: GKVQueryRing | None, scores: GKVScores | None, scale: float,
            timed: bool = True) -> None:
        """Selects every layer's kept rows and compacts them all (``timed``: CUDA events
        around it); ``ring`` and ``scores`` are G-KV's (``None`` for StreamingLLM)."""
        with self._timed() if timed else contextlib.nullcontext():
            jobs = self.jobs
            kept_per_layer = []
            for layer, kv_cache in enumerate(kv_caches):
                if isinstance(self.policy, StreamingLLMDecodePolicy):
                    # the sinks and the recent rows, from the row counts alone: no keys read
                    rows = self.policy.kept_rows(jobs.num_rows, jobs.budget)
                    kept = rows[:, None].expand(-1, kv_cache.shape[1], -1)
                else:
                    kept = self._score_layer(layer, kv_cache, ring, scores, scale)
                kept_per_layer.append(kept + jobs.source_start[:, None, None])
                if self.recorder is not None:
                    for j, (req_id, job) in enumerate(zip(jobs.req_ids, jobs.jobs)):
                        self.recorder.record(req_id, job.event, layer, kept[j].cpu())
            compact_paged(kv_caches, jobs.block_rows, torch.stack(kept_per_layer), jobs.num_kept,
                          dest_start=jobs.dest_start)

    def _score_layer(self, layer: int, kv_cache: torch.Tensor, ring: GKVQueryRing, scores: GKVScores,
                     scale: float) -> torch.Tensor:
        """G-KV's ``[J, H, b]`` kept rows of one layer; writes the new ``F`` of the scored
        kept rows where compaction puts them."""
        jobs, scored_rows = self.jobs, self.jobs.budget - self.policy.window
        block_size = kv_cache.shape[2]
        previous_slots = _physical_slots(jobs.block_rows, jobs.source_start, scored_rows, block_size)
        selection = self._select(
            ring.windows(layer, jobs.slots), resident_keys(kv_cache, jobs), scores.read(layer, previous_slots), scale
        )
        # the scored kept rows are the first b - w of [S_i, S_i + b)
        scores.write(layer, _physical_slots(jobs.block_rows, jobs.dest_start, scored_rows, block_size),
                     selection.global_scores)
        return selection.kept

    def _select(self, queries, keys, previous, scale: float) -> GKVSelection:
        jobs = self.jobs
        per_chunk = jobs_per_chunk(queries.shape[2], self.policy.window, jobs.max_rows)
        parts = [
            select_gkv(
                self.policy, queries[start:end], keys[start:end], jobs.num_rows[start:end], previous[start:end],
                jobs.has_previous[start:end], scale, jobs.budget,
            )
            for start, end in _chunks(len(jobs.jobs), per_chunk)
        ]
        if len(parts) == 1:
            return parts[0]
        return GKVSelection(torch.cat([p.kept for p in parts]), torch.cat([p.global_scores for p in parts]))

    def gpu_seconds(self) -> float:
        """GPU time of the events; waits for the last CUDA event (done already once the
        step's sampled tokens have reached the host)."""
        self.events[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self.events) / 1e3

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events.append((start, end))


def resident_keys(kv_cache: torch.Tensor, jobs: GKVEventJobs) -> torch.Tensor:
    """``[J, H, max_rows, D]`` the events' resident keys (rows past an event's own count
    repeat its last row: padding, masked in the selection).

    Args:
        kv_cache: [num_blocks, H, block_size, 2 * D] one layer's cache (K then V per row).
    """
    block_size, head_dim = kv_cache.shape[2], kv_cache.shape[3] // 2
    rows = torch.arange(jobs.max_rows, device=kv_cache.device)
    logical = jobs.source_start[:, None] + torch.minimum(rows[None, :], jobs.num_rows[:, None] - 1)
    blocks = jobs.block_rows.gather(1, logical // block_size).long()
    # advanced indices around a slice: the result is [J, N, H, D]
    return kv_cache[blocks, :, logical % block_size, :head_dim].permute(0, 2, 1, 3)


def _physical_slots(block_rows: torch.Tensor, start: torch.Tensor, count: int, block_size: int) -> torch.Tensor:
    """``[J, count]`` physical slots of logical ``[start[j], start[j] + count)``."""
    logical = start.long()[:, None] + torch.arange(count, device=block_rows.device)
    return block_rows.gather(1, logical // block_size).long() * block_size + logical % block_size


def _chunks(count: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, count, size):
        yield start, min(start + size, count)
