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

from ..policies import EvictionPolicy
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
    """

    jobs: list[CompactionJob] = field(default_factory=list)
    shifted_rows: list[ShiftedRow] = field(default_factory=list)
    policy: EvictionPolicy | None = None
    num_layers: int = 0
    recorder: KeptIndexRecorder | None = None
    layer_slot_mappings: list[torch.Tensor] | None = None
    timer: CompactionTimer = field(default_factory=CompactionTimer)


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
