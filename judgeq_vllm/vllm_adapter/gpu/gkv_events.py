"""The decode-time events of one step on Model Runner V2: select (G-KV: score, carry
``F``), compact.

NOTE on the order (docs/engine-design.md §6.6). An event at ``T`` runs at the end of the
step whose tokens end at ``T``, after the whole forward: every layer has attended over
the uncompacted rows and copied its window queries into the ring (``gkv_window.py``) by
then. It gathers each layer's resident keys ``[S_{i-1}, T - delta_{i-1})`` from the paged
cache, the previous global scores ``F`` at the first ``b - w`` of them, and selects
(``gkv_scoring.select_gkv``); the new ``F`` of the scored kept rows goes to the physical
slots of ``[S_i, S_i + b - w)``, where compaction puts those rows. Then one
``compact_paged`` launch moves every layer's kept K|V rows to ``[S_i, S_i + b)`` (it
handles both directions of overlap). All on the model's stream, no host sync.

NOTE on the cost. Nothing here waits for the GPU, but every torch op costs the host tens
of microseconds to launch, and the GPU idles behind it: the work is small (``N <= b +
interval`` rows per event). Selecting layer by layer made an event step about 2,200
launches for a 32-layer model, 86 ms of GPU time on an H100 (``benchmarks/results/
gpu-path/runs/session7``). So the slots, windows and previous scores are gathered once
for all layers, and ``select_gkv`` scores several layers' events in one batch
(:func:`event_batches`), as many ``(layer, request)`` pairs as its memory bound allows.

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
from .gkv_scoring import pairs_per_chunk, select_gkv
from .gkv_window import GKVQueryRing


class GKVScores:
    """The running global score ``F`` of every layer, by physical KV slot."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, device: torch.device):
        self.scores = torch.zeros(num_layers, num_slots, num_kv_heads, dtype=torch.float32, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int) -> int:
        return num_layers * num_kv_heads * 4

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """``[L, J, H, m]`` every layer's scores at physical ``slots`` ``[J, m]``."""
        return self.scores[:, slots].transpose(-1, -2)

    def write(self, layers: slice, slots: torch.Tensor, scores: torch.Tensor) -> None:
        """Stores ``scores`` ``[G, J, H, m]`` of ``layers`` (``G`` of them) at physical
        ``slots`` ``[J, m]``."""
        self.scores[layers, slots] = scores.transpose(-1, -2)


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
            if isinstance(self.policy, StreamingLLMDecodePolicy):
                # the sinks and the recent rows, from the row counts alone: no keys read
                rows = self.policy.kept_rows(jobs.num_rows, jobs.budget)
                kept = rows[None, :, None].expand(len(kv_caches), -1, kv_caches[0].shape[1], -1)
            else:
                kept = self._score_layers(kv_caches, ring, scores, scale)
            if self.recorder is not None:
                for layer in range(len(kv_caches)):
                    for j, (req_id, job) in enumerate(zip(jobs.req_ids, jobs.jobs)):
                        self.recorder.record(req_id, job.event, layer, kept[layer, j].cpu())
            compact_paged(kv_caches, jobs.block_rows, kept + jobs.source_start[:, None, None], jobs.num_kept,
                          dest_start=jobs.dest_start)

    def _score_layers(self, kv_caches: list[torch.Tensor], ring: GKVQueryRing, scores: GKVScores,
                      scale: float) -> torch.Tensor:
        """G-KV's ``[L, J, H, b]`` kept rows of every layer; writes the new ``F`` of the
        scored kept rows where compaction puts them."""
        jobs, scored_rows = self.jobs, self.jobs.budget - self.policy.window
        _, num_kv_heads, block_size, packed = kv_caches[0].shape
        blocks, offsets = resident_slots(jobs, block_size)
        windows = ring.windows(jobs.slots)  # [L, J, w, Hq, D]
        previous = scores.read(_physical_slots(jobs.block_rows, jobs.source_start, scored_rows, block_size))
        dest_slots = _physical_slots(jobs.block_rows, jobs.dest_start, scored_rows, block_size)
        per_batch = pairs_per_chunk(windows.shape[3], num_kv_heads, packed // 2, self.policy.window, jobs.max_rows)
        kept = torch.empty(len(kv_caches), len(jobs.jobs), num_kv_heads, jobs.budget, dtype=torch.int64,
                           device=blocks.device)
        for layers, reqs in event_batches(len(kv_caches), len(jobs.jobs), per_batch):
            num_layers = layers.stop - layers.start
            # [G, J, N, H, D] -> [G * J, H, N, D], a view (G and J stay adjacent)
            keys = torch.stack([
                cache[blocks[reqs], :, offsets[reqs], : packed // 2] for cache in kv_caches[layers]
            ]).transpose(2, 3).flatten(0, 1)
            selection = select_gkv(
                self.policy, windows[layers, reqs].flatten(0, 1), keys, jobs.num_rows[reqs].repeat(num_layers),
                previous[layers, reqs].flatten(0, 1), jobs.has_previous[reqs].repeat(num_layers), scale, jobs.budget,
            )
            # the scored kept rows are the first b - w of [S_i, S_i + b)
            scores.write(layers, dest_slots[reqs], selection.global_scores.unflatten(0, (num_layers, -1)))
            kept[layers, reqs] = selection.kept.unflatten(0, (num_layers, -1))
        return kept

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


def resident_slots(jobs: GKVEventJobs, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[J, max_rows]`` block ids and in-block offsets of the events' resident rows, the
    same in every layer (rows past an event's own count repeat its last row: padding,
    masked in the selection). A layer's keys ``[J, max_rows, H, D]`` are then
    ``cache[blocks, :, offsets, :D]`` for a ``[num_blocks, H, block_size, 2 * D]`` cache."""
    rows = torch.arange(jobs.max_rows, device=jobs.block_rows.device)
    logical = jobs.source_start[:, None] + torch.minimum(rows[None, :], jobs.num_rows[:, None] - 1)
    return jobs.block_rows.gather(1, logical // block_size).long(), logical % block_size


def event_batches(num_layers: int, num_events: int, per_batch: int) -> Iterator[tuple[slice, slice]]:
    """``(layers, events)`` scored in one ``select_gkv`` batch of at most ``per_batch``
    ``(layer, request)`` pairs: whole layers of every event while one layer fits, else one
    layer's events in runs."""
    if num_events <= per_batch:
        step = per_batch // num_events
        for start in range(0, num_layers, step):
            yield slice(start, min(start + step, num_layers)), slice(0, num_events)
        return
    for layer in range(num_layers):
        for start in range(0, num_events, per_batch):
            yield slice(layer, layer + 1), slice(start, min(start + per_batch, num_events))


def _physical_slots(block_rows: torch.Tensor, start: torch.Tensor, count: int, block_size: int) -> torch.Tensor:
    """``[J, count]`` physical slots of logical ``[start[j], start[j] + count)``."""
    logical = start.long()[:, None] + torch.arange(count, device=block_rows.device)
    return block_rows.gather(1, logical // block_size).long() * block_size + logical % block_size
