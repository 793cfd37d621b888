"""What one forward pass's attention layers need to know about eviction.

The runner builds an :class:`EvictionStep` after it has laid out the step's inputs, and
makes it current for the duration of ``execute_model``; the attention backend (metadata
builder and layer implementation) reads it with :func:`current_step`. vLLM's forward
context has no slot for plugin data, hence this module-level channel; it is ``None``
whenever no request of the step has a plan, and then the backend does exactly what
vLLM's does. The same structure serves the CPU runner and, later, the GPU one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..policies import DecodePolicy, EvictionPolicy
from .decode_plan import GKVJob
from .plan import EvictionPlan


@dataclass(frozen=True)
class CompactionJob:
    """One request whose prompt ends in this step: score, select and compact it.

    Attributes:
        req_id: the engine's request id.
        row: the request's row in the batch (``query_start_loc`` index).
        plan: its eviction plan.
        block_ids: its block-table row (int64); entries ``[0, cdiv(L', bs))`` are valid.
    """

    req_id: str
    row: int
    plan: EvictionPlan
    block_ids: torch.Tensor


@dataclass(frozen=True)
class ShiftedRow:
    """A request that reads a compacted cache: attention starts at block
    ``plan.freed_blocks`` of its row and, in layer ``l``, sees ``plan.layer_evicted_len(l)``
    fewer tokens than vLLM counts."""

    row: int
    plan: EvictionPlan


class KeptIndexRecorder:
    """Opt-in debug record of the kept token indices, per (request, layer).

    Off by default (the runner's ``kept_index_recorder`` is ``None``): tests attach one
    in-process to compare the engine's choices with the HF reference's.
    """

    def __init__(self) -> None:
        # engine request id -> layer index -> [num_kv_heads, k] kept prompt-token indices;
        # a request compacted again after preemption overwrites its entry
        self.kept: dict[str, dict[int, torch.Tensor]] = {}
        self.compactions = 0

    def record(self, req_id: str, layer_idx: int, kept: torch.Tensor) -> None:
        if layer_idx == 0:
            self.compactions += 1
        self.kept.setdefault(req_id, {})[layer_idx] = kept.clone()

    def for_request(self, request_id: str) -> dict[int, torch.Tensor] | None:
        """The record of the request the front end calls ``request_id`` (vLLM's engine
        ids are ``<front-end id>-<random suffix>``), or ``None`` if it was not compacted."""
        found = [kept for engine_id, kept in self.kept.items() if engine_id.rsplit("-", 1)[0] == request_id]
        assert len(found) <= 1, f"several engine requests match {request_id!r}"
        return found[0] if found else None


@dataclass(frozen=True)
class GKVStepJob:
    """A decode-time event that runs at the end of this step's attention, per layer.

    Attributes:
        req_id: the engine's request id.
        job: the event (its source and target layouts).
        block_ids: the request's block-table row (int64).
    """

    req_id: str
    job: GKVJob
    block_ids: torch.Tensor


@dataclass(frozen=True)
class QueryCapture:
    """Query rows of this step that belong to a request's next G-KV window.

    Attributes:
        req_id: the engine's request id.
        first_token: index of the first row in the step's flattened tokens.
        window_offset: its index in the window.
        count: rows captured.
    """

    req_id: str
    first_token: int
    window_offset: int
    count: int


class GKVWorkerState:
    """The worker's decode-time state: the decode policy, G-KV's query windows being
    filled, and its running global scores beside the KV cache (docs/engine-design.md §6.3;
    a policy without a window or scores leaves both empty).

    Scores live per layer in ``[num_slots, num_kv_heads]`` fp32, indexed by physical KV slot
    like the rows they score; a request reads only scores its own previous event wrote, so
    nothing is kept per request there. A window lives from its first captured row until its
    event has run in the last layer (or its request finishes).
    """

    def __init__(self, policy: DecodePolicy, num_layers: int):
        self.policy = policy
        self.num_layers = num_layers
        self.windows: dict[str, torch.Tensor] = {}  # request id -> [num_layers, window, Hq, D]
        self.scores: dict[int, torch.Tensor] = {}

    def capture(self, req_id: str, layer_idx: int, queries: torch.Tensor, window_offset: int) -> None:
        window = self.windows.get(req_id)
        if window is None:
            window = self.windows[req_id] = queries.new_zeros(self.num_layers, self.policy.window, *queries.shape[1:])
        window[layer_idx, window_offset : window_offset + queries.shape[0]] = queries

    def layer_scores(self, layer_idx: int, num_slots: int, num_kv_heads: int) -> torch.Tensor:
        scores = self.scores.get(layer_idx)
        if scores is None:
            scores = self.scores[layer_idx] = torch.zeros(num_slots, num_kv_heads)
        return scores

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            self.windows.pop(req_id, None)


class GKVEventRecorder:
    """Opt-in debug record of decode-time kept rows (indices into the rows resident before the
    event), per request, event and layer; tests compare them with the HF reference's."""

    def __init__(self) -> None:
        self.kept: dict[str, dict[int, dict[int, torch.Tensor]]] = {}

    def record(self, req_id: str, event: int, layer_idx: int, kept: torch.Tensor) -> None:
        self.kept.setdefault(req_id, {}).setdefault(event, {})[layer_idx] = kept.clone()

    def for_request(self, request_id: str) -> dict[int, dict[int, torch.Tensor]]:
        """Events of the request the front end calls ``request_id`` (empty if none ran)."""
        found = [kept for engine_id, kept in self.kept.items() if engine_id.rsplit("-", 1)[0] == request_id]
        assert len(found) <= 1, f"several engine requests match {request_id!r}"
        return found[0] if found else {}


@dataclass
class CompactionTimer:
    """Seconds one forward pass has spent in scoring and compaction, all layers."""

    seconds: float = 0.0


@dataclass(frozen=True)
class EvictionStep:
    """The eviction work and offsets of one forward pass.

    Attributes:
        jobs: requests compacted at the end of this step's attention, per layer.
        shifted_rows: requests whose attention reads the compacted layout.
        policy: the engine's eviction policy.
        num_layers: the model's attention layers.
        recorder: where kept indices go, if a test asked for them.
        layer_slot_mappings: per layer, the KV slots of the step's tokens, when a shifted
            request keeps a different count per layer (PyramidKV); ``None``: every layer
            writes where the runner's slot mapping says.
        timer: where the attention layers add the time their compaction takes.
        gkv_jobs: decode-time events run at the end of this step's attention, per layer.
        gkv_captures: query rows of this step that go into G-KV windows.
        gkv_state: the worker's decode policy, windows and global scores (decode-time engines only).
        gkv_recorder: where decode-time kept rows go, if a test asked for them.
    """

    jobs: list[CompactionJob] = field(default_factory=list)
    shifted_rows: list[ShiftedRow] = field(default_factory=list)
    policy: EvictionPolicy | None = None
    num_layers: int = 0
    recorder: KeptIndexRecorder | None = None
    layer_slot_mappings: list[torch.Tensor] | None = None
    timer: CompactionTimer = field(default_factory=CompactionTimer)
    gkv_jobs: list[GKVStepJob] = field(default_factory=list)
    gkv_captures: list[QueryCapture] = field(default_factory=list)
    gkv_state: GKVWorkerState | None = None
    gkv_recorder: GKVEventRecorder | None = None


# the ModelRunnerOutput attribute by which a worker reports, for a step that compacted,
# the seconds it spent scoring and compacting (the scheduler's eviction-time histogram;
# an extra attribute survives the pickled worker -> EngineCore hop)
EVICTION_SECONDS_ATTR = "judgeq_eviction_seconds"


_CURRENT: EvictionStep | None = None


def current_step() -> EvictionStep | None:
    return _CURRENT


def set_current_step(step: EvictionStep | None) -> None:
    global _CURRENT
    _CURRENT = step


@contextlib.contextmanager
def step_scope() -> Iterator[None]:
    """Clears the current step when a forward pass ends, whatever happened in it."""
    try:
        yield
    finally:
        set_current_step(None)
