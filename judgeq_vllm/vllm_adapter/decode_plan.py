"""Decode-time eviction (G-KV, StreamingLLM's decode variant) as a sequence of compaction
events; docs/engine-design.md §6.

NOTE on the model. Event ``i`` runs at the end of the step after which vLLM counts
``T_i`` computed tokens, and leaves every (layer, kv head) with ``b`` rows at logical slots
``[S_i, S_i + b)``, ``S_i = (T_i - b) // bs * bs``, ``delta_i = T_i - S_i - b < bs``. That is
exactly the one-shot plan's formula sheet with ``L' -> T_i`` and ``k -> b``, so the layout
after an event is an :class:`EvictionPlan` (``total_len = T_i``) and the worker's existing
rules for compacted requests (RoPE ``p - n_soft``, slot ``p - delta``, attention from block
``S / bs``) apply unchanged. Which events exist follows from the prompt length, the
budget and the interval alone: the scheduler knows them when it admits the request.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..policies import DecodePolicy
from .plan import EvictionPlan


# tokens a request may still add after an event's step before that event's head blocks
# are back in the pool: the step is processed after the next one is scheduled (async)
EVENT_FREE_LAG = 2


@dataclass(frozen=True)
class GKVSchedule:
    """The decode-time events of one request (G-KV's schedule, whatever the policy).

    Attributes:
        prompt_len: ``P``, the user's prompt.
        num_soft: soft tokens inserted by a Judge Q prefill plan, else 0.
        budget: ``b``, rows kept per (layer, kv head) at every event.
        window: ``w``, the queries (G-KV: and protected last rows) of an event; 0: none.
        interval: events happen every ``interval`` forward passes.
        block_size: KV-cache block size.
        num_layers: attention layers of the model.
        prefill: the prefill policy's plan (``judgeq+gkv``), or ``None``.
    """

    prompt_len: int
    num_soft: int
    budget: int
    window: int
    interval: int
    block_size: int
    num_layers: int
    prefill: EvictionPlan | None = None

    @property
    def prompt_end(self) -> int:
        """``L'``: vLLM's prompt length; forward pass ``j`` leaves ``L' + j`` tokens computed."""
        return self.prompt_len + self.num_soft

    @property
    def first_event(self) -> int:
        """``T`` of the first event: the prefill's end if the policy compresses the prompt,
        else the first pass boundary at which the resident rows exceed the budget."""
        if self.prefill is None and self.prompt_end > self.budget:
            return self.prompt_end
        if self.prefill is not None:
            # the prefill left min(b, P) rows, and b + interval > b
            return self.prompt_end + self.interval
        passes = max(1, (self.budget - self.prompt_end) // self.interval + 1)
        return self.prompt_end + passes * self.interval

    def is_event(self, num_tokens: int) -> bool:
        """Whether an event runs once vLLM counts ``num_tokens`` computed tokens."""
        first = self.first_event
        return num_tokens >= first and (num_tokens - first) % self.interval == 0

    def next_event(self, num_tokens: int) -> int:
        """The first event ``T > num_tokens``."""
        first = self.first_event
        if num_tokens < first:
            return first
        return first + ((num_tokens - first) // self.interval + 1) * self.interval

    def last_event(self, num_tokens: int) -> int | None:
        """The latest event ``T <= num_tokens``, or ``None``."""
        first = self.first_event
        if num_tokens < first:
            return None
        return first + (num_tokens - first) // self.interval * self.interval

    @functools.cached_property
    def resident_block_cap(self) -> int:
        """The most blocks the request holds from ``first_event + EVENT_FREE_LAG`` tokens on.

        After event ``T`` it holds the blocks from ``S_T`` to its length, which grows until
        the next event's step ``T + interval``; that event's head blocks return to the pool
        once its step is processed, up to ``EVENT_FREE_LAG`` tokens later. ``S_T``'s block
        alignment repeats every ``block_size`` events, so those events give the maximum.
        """
        events = (self.first_event + i * self.interval for i in range(self.block_size))
        return max(
            -(-(event + self.interval + EVENT_FREE_LAG) // self.block_size) - self.layout(event).freed_blocks
            for event in events
        )

    def layout(self, event: int) -> EvictionPlan:
        """The layout event ``T = event`` leaves (as a one-shot plan ending at ``T``)."""
        return EvictionPlan(
            prompt_len=event - self.num_soft,
            num_soft=self.num_soft,
            num_observations=self.window,
            budget_keep=self.budget,
            layer_keeps=(self.budget,) * self.num_layers,
            block_size=self.block_size,
        )

    def layout_before(self, num_tokens: int) -> EvictionPlan | None:
        """The layout a step starting at ``num_tokens`` computed tokens reads: the latest
        event's, else the prefill plan's once the prompt is in, else ``None`` (uncompacted)."""
        event = self.last_event(num_tokens)
        if event is not None:
            return self.layout(event)
        if self.prefill is not None and num_tokens >= self.prefill.total_len:
            return self.prefill
        return None

    def has_previous_scores(self, event: int) -> bool:
        """Whether an earlier event ran (and, for a policy that carries global scores,
        left them for this one)."""
        return event > self.first_event

    @property
    def first_kept_slot(self) -> int:
        """The lowest ``S`` any compaction of the request writes from (blocks from there on
        are never hashed for prefix caching)."""
        first = self.layout(self.first_event).first_kept_slot
        return first if self.prefill is None else min(first, self.prefill.first_kept_slot)

    def prefix_hit_cap(self) -> int:
        """Longest prefix-cache hit: below every compaction's destination and below the
        first event's query window (its queries must be computed)."""
        window_start = (self.first_event - self.window) // self.block_size * self.block_size
        cap = min(self.first_kept_slot, window_start)
        return cap if self.prefill is None else min(cap, self.prefill.prefix_hit_cap)


@dataclass(frozen=True)
class GKVJob:
    """An event that runs at the end of this step.

    Attributes:
        event: ``T``, tokens computed when it runs.
        source: the layout the resident rows are in (``None``: uncompacted, rows ``[0, T)``).
        target: the layout it leaves.
        has_previous_scores: whether an earlier event ran (G-KV: its ``F`` sits at the
            source's first rows).
    """

    event: int
    source: EvictionPlan | None
    target: EvictionPlan
    has_previous_scores: bool

    @property
    def source_start(self) -> int:
        """First resident logical slot."""
        return 0 if self.source is None else self.source.first_kept_slot

    @property
    def source_end(self) -> int:
        """One past the last resident logical slot."""
        return self.event - (0 if self.source is None else self.source.slot_shift)


@dataclass(frozen=True)
class GKVCapture:
    """Query rows of this step that belong to an event's window.

    Attributes:
        event: ``T`` of the event.
        first_token: offset of the first captured token inside the request's scheduled tokens.
        window_offset: its index in the window (``0 .. w - 1``).
        count: tokens captured.
    """

    event: int
    first_token: int
    window_offset: int
    count: int


def step_work(schedule: GKVSchedule, num_computed: int, num_scheduled: int) -> tuple[GKVJob | None, GKVCapture | None]:
    """The event ending at this step's end, and this step's rows of the next event's
    query window. The chunk rule (:func:`split_at_events`) keeps a step from crossing an
    event, so the next event after ``num_computed`` is the only one the step can touch."""
    end = num_computed + num_scheduled
    event = schedule.next_event(num_computed)
    assert end <= event, f"a step [{num_computed}, {end}) crosses the event at {event}"
    window_start = event - schedule.window
    first = max(num_computed, window_start)
    capture = GKVCapture(event, first - num_computed, first - window_start, end - first) if first < end else None
    job = None
    if end == event:
        job = GKVJob(event, schedule.layout_before(num_computed), schedule.layout(event), schedule.has_previous_scores(event))
    return job, capture


def split_at_events(schedule: GKVSchedule, num_computed: int, num_new_tokens: int) -> int:
    """Tokens of a chunk starting at ``num_computed`` that may run in this step: it stops at
    the next event, so each event runs at the end of its own step."""
    event = schedule.next_event(num_computed)
    return min(num_new_tokens, event - num_computed)


def gkv_schedule(
    prompt_len: int, policy: DecodePolicy, budget: int, block_size: int, num_layers: int, prefill: EvictionPlan | None
) -> GKVSchedule:
    return GKVSchedule(
        prompt_len=prompt_len,
        num_soft=prefill.num_soft if prefill is not None else 0,
        budget=budget,
        window=policy.window,
        interval=policy.interval,
        block_size=block_size,
        num_layers=num_layers,
        prefill=prefill,
    )
