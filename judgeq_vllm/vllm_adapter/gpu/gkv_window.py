"""G-KV query windows on Model Runner V2, captured inside FULL CUDA graphs.

NOTE on the design (docs/engine-design.md §6.4, §6.6). An event at ``T`` scores with the
post-RoPE queries of positions ``[T - w, T)``, computed by the decode steps themselves (or
by a prefill chunk). A FULL decode graph runs no Python, so the capture cannot be decided
per step in the attention layer: each layer's ``forward`` always enqueues one
``index_copy_`` of its queries into a persistent ring, ``ring[layer][ring_rows[t]] =
query[t]``, and that copy is recorded into the graphs like any other kernel. What changes
per step is only the content of the persistent ``ring_rows`` buffer, written before the
forward by one Triton launch (:func:`apply_gkv_ring_rows`) from the logical positions and a
per-slot schedule: the first event ``T_0`` of the slot's request (events then follow every
``interval`` tokens). A token at ``p`` belongs to the window of the first event ``T > p``
iff ``p >= T - w``; it goes to ring row ``slot * w + (p - T + w)``, every other token (and
every padding token) to one spare row nobody reads. ``interval >= w``, so a window never
spans two events, and each event's rows are written by its own window's steps before it
runs: nothing needs clearing when a slot gets another request.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from vllm.v1.worker.gpu.buffer_utils import StagedWriteTensor


# first event of a slot without a G-KV schedule: no position reaches its window
NO_SCHEDULE = 2**31 - 1
_BLOCK = 256


@triton.jit(do_not_specialize=["num_reqs", "num_tokens", "num_tokens_padded", "spare_row"])
def gkv_ring_rows_kernel(
    idx_mapping,
    query_start_loc,
    positions,
    first_events,
    ring_rows,
    num_reqs,
    num_tokens,
    num_tokens_padded,
    spare_row,
    interval,
    window,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    if b == num_reqs:
        # the last program points the padding tokens at the spare row
        for start in range(num_tokens, num_tokens_padded, BLOCK):
            o = start + tl.arange(0, BLOCK)
            m = o < num_tokens_padded
            tl.store(ring_rows + o, tl.zeros([BLOCK], tl.int64) + spare_row, mask=m)
        return
    r = tl.load(idx_mapping + b).to(tl.int64)
    first = tl.load(first_events + r).to(tl.int64)
    q_start = tl.load(query_start_loc + b)
    q_end = tl.load(query_start_loc + b + 1)
    for start in range(q_start, q_end, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < q_end
        pos = tl.load(positions + o, mask=m, other=0)
        # the first event after pos
        event = tl.where(pos < first, first, first + ((pos - first) // interval + 1) * interval)
        offset = pos - (event - window)
        row = tl.where(offset >= 0, r * window + offset, spare_row)
        tl.store(ring_rows + o, row, mask=m)


def apply_gkv_ring_rows(
    idx_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    positions: torch.Tensor,
    first_events: torch.Tensor,
    ring_rows: torch.Tensor,
    num_reqs: int,
    num_tokens: int,
    num_tokens_padded: int,
    interval: int,
    window: int,
) -> None:
    """Launches :func:`gkv_ring_rows_kernel` on the current stream (no host sync).

    Args:
        idx_mapping: [num_reqs] int32, batch row -> request slot.
        query_start_loc: [num_reqs + 1] int32.
        positions: [>= num_tokens] int64 logical positions (vLLM's).
        first_events: [max_num_reqs] int32 ``T_0`` by request slot (``NO_SCHEDULE``: none).
        ring_rows: [>= num_tokens_padded] int64 (written); its spare row is
            ``max_num_reqs * window`` (``first_events.shape[0] * window``).
    """
    spare_row = first_events.shape[0] * window
    gkv_ring_rows_kernel[(num_reqs + 1,)](
        idx_mapping, query_start_loc, positions, first_events, ring_rows,
        num_reqs, num_tokens, num_tokens_padded, spare_row, interval, window,
        BLOCK=_BLOCK,
    )


def reference_gkv_ring_rows(
    idx_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    positions: torch.Tensor,
    first_events: torch.Tensor,
    ring_rows: torch.Tensor,
    num_reqs: int,
    num_tokens: int,
    num_tokens_padded: int,
    interval: int,
    window: int,
) -> None:
    """The rule of the module note as plain loops (the kernel's test oracle)."""
    spare_row = first_events.shape[0] * window
    ring_rows[:num_tokens_padded] = spare_row
    for b in range(num_reqs):
        r = int(idx_mapping[b])
        first = int(first_events[r])
        for t in range(int(query_start_loc[b]), int(query_start_loc[b + 1])):
            pos = int(positions[t])
            event = first if pos < first else first + ((pos - first) // interval + 1) * interval
            if pos >= event - window:
                ring_rows[t] = r * window + pos - (event - window)


class GKVQueryRing:
    """Per-layer query windows by request slot, the per-slot schedules and this step's rows.

    Memory: ``L * (max_num_reqs * w + 1) * Hq * D`` elements of the model dtype, allocated
    with the runner (before vLLM profiles memory, so the KV cache is sized around it).
    """

    def __init__(self, num_layers: int, max_num_reqs: int, max_num_tokens: int, window: int, interval: int,
                 num_q_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.window = window
        self.interval = interval
        # the last row is the spare one every token outside a window is copied to
        self.queries = torch.zeros(num_layers, max_num_reqs * window + 1, num_q_heads, head_dim, dtype=dtype,
                                   device=device)
        self._layer_queries = self.queries.unbind(0)
        self.first_events = StagedWriteTensor(max_num_reqs, dtype=torch.int32, device=device)
        self.first_events.gpu.fill_(NO_SCHEDULE)
        # host mirror: which slots' requests have a schedule (whether a step needs the rows)
        self.scheduled = np.zeros(max_num_reqs, dtype=bool)
        self.spare_row = max_num_reqs * window
        # dummy runs and graph capture see only the spare row
        self.ring_rows = torch.full((max_num_tokens,), self.spare_row, dtype=torch.int64, device=device)
        self._pending: dict[int, int] = {}

    # ---- per request ----------------------------------------------------------------

    def set_slot(self, slot: int, first_event: int | None) -> None:
        """The slot's request and its schedule's first event (``None``: served without
        G-KV); every later window follows from it and the interval."""
        self._pending[slot] = NO_SCHEDULE if first_event is None else first_event
        self.scheduled[slot] = first_event is not None

    def apply_writes(self) -> None:
        # one write per slot: apply_write takes at most max_num_reqs rows
        if self._pending:
            for slot, first_event in self._pending.items():
                self.first_events.stage_write_elem(slot, first_event)
            self.first_events.apply_write()
            self._pending.clear()

    # ---- per step -------------------------------------------------------------------

    def compute_rows(self, input_batch) -> None:
        """Points this step's tokens at their ring rows (every step of a G-KV engine: the
        previous step's rows must not linger in a graph's replay)."""
        apply_gkv_ring_rows(
            input_batch.idx_mapping,
            input_batch.query_start_loc,
            input_batch.positions,
            self.first_events.gpu,
            self.ring_rows,
            num_reqs=input_batch.num_reqs,
            num_tokens=input_batch.num_tokens,
            num_tokens_padded=input_batch.num_tokens_after_padding,
            interval=self.interval,
            window=self.window,
        )

    def reset_rows(self) -> None:
        """Points every token at the spare row: a dummy run (no ``prepare_attn``) must not
        write into the windows the last real step pointed at."""
        self.ring_rows.fill_(self.spare_row)

    def capture(self, layer: int, query: torch.Tensor) -> None:
        """Copies ``layer``'s queries of this step into the ring (recorded into CUDA graphs).

        Args:
            query: [num_tokens (padded), num_q_heads, head_dim] post-RoPE queries.
        """
        self._layer_queries[layer].index_copy_(0, self.ring_rows[: query.shape[0]], query)

    def windows(self, slots: torch.Tensor) -> torch.Tensor:
        """``[L, J, w, Hq, D]`` every layer's window of each request slot in ``slots`` ([J]
        int64), in one gather."""
        rows = slots[:, None] * self.window + torch.arange(self.window, device=slots.device)
        return self.queries[:, rows]
