"""In-place compaction of kept KV rows inside each request's own blocks (Triton)."""

import torch
import triton
import triton.language as tl

from ..utils import check_index_tensor, check_kv_cache, check_same_device

# the kernel copies bits, so each float dtype moves as the integer of its width
_BITS_DTYPE = {2: tl.int16, 4: tl.int32}


@triton.jit
def _row_offsets(
    p_bt,  # [max_blocks_per_req] block table row of the request
    o_tok,
    m_tok,
    s_kb: tl.int64,
    s_kt: tl.int64,
    BS: tl.constexpr,
):
    b_blk = tl.load(p_bt + o_tok // BS, mask=m_tok, other=0).to(tl.int64)
    return b_blk * s_kb + (o_tok % BS) * s_kt


# the job count and the strides that follow it and the kept count change from step to
# step: no specialisation on them, so a serving engine compiles this kernel once
@triton.jit(do_not_specialize=["s_il", "s_ib", "s_ih", "s_nl", "B"])
def compact_kernel(
    kv_cache_ptrs,  # [L] int64: data pointer of each layer's cache [num_blocks, HKV, BS, 2 * D]
    block_tables,  # [B, max_blocks_per_req]
    kept_indices,  # [L, B, HKV, K_MAX], sorted ascending and unique along the last dim
    num_kept,  # [L, B] (a [B] input is broadcast with layer stride 0)
    dest_start,  # [B] logical token where each request's kept rows start
    s_kb: tl.int64,
    s_kh: tl.int64,
    s_kt: tl.int64,
    s_bt: tl.int64,
    s_il: tl.int64,
    s_ib: tl.int64,
    s_ih: tl.int64,
    s_nl: tl.int64,
    s_nb: tl.int64,
    B,
    HKV: tl.constexpr,
    BS: tl.constexpr,
    ROW: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_ROW: tl.constexpr,
    ELEM: tl.constexpr,
):
    # one program per (layer, request, kv head); the flat grid avoids the 65535 limit of
    # grid axes 1 and 2
    i_lbh = tl.program_id(0).to(tl.int64)
    i_h = i_lbh % HKV
    i_b = (i_lbh // HKV) % B
    i_l = i_lbh // (HKV * B)
    n_kept = tl.load(num_kept + i_l * s_nl + i_b * s_nb).to(tl.int64)
    # a pointer read from memory has no known alignment; torch allocations are 16-byte
    # aligned, which lets the copies use 16-byte vector accesses
    p_cache = tl.load(kv_cache_ptrs + i_l).to(tl.pointer_type(ELEM))
    p_cache = tl.multiple_of(p_cache, 16) + i_h * s_kh
    p_bt = block_tables + i_b * s_bt
    p_idx = kept_indices + i_l * s_il + i_b * s_ib + i_h * s_ih
    d_start = tl.load(dest_start + i_b).to(tl.int64)
    o_c = tl.arange(0, BLOCK_ROW)

    # NOTE on overlap: row j goes from s_j = kept[j] to d_j = d_start + j. kept is sorted
    # and unique, so s_j - d_j never decreases with j: the rows that move left (s_j > d_j)
    # are a suffix of j, the rows that move right (s_j < d_j) a prefix, and every right
    # move's source and destination lie below every left move's (s_j < d_j < d_m <= s_m
    # for j < m in the two groups), so the groups never touch each other's rows.
    # - Left moves go in ascending chunks of j: a later chunk reads s_j' >= j' + d_start,
    #   above every destination already written.
    # - Right moves go in descending chunks: a later chunk reads s_j' < s_j < d_j for the
    #   rows j already written.
    # So a chunk's loads may also be issued before the previous chunk's stores complete.
    # - Within a chunk a destination may be another row's source (kept = [1, 2, 3, ...]):
    #   every thread loads the chunk's rows before any thread stores (the barrier).
    # Rows already in place (s_j == d_j) are skipped.
    n_chunks = tl.cdiv(n_kept, BLOCK_J)
    for i_chunk in range(0, 2 * n_chunks):
        moves_left = i_chunk < n_chunks
        j0 = tl.where(moves_left, i_chunk, 2 * n_chunks - 1 - i_chunk) * BLOCK_J
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = o_j < n_kept
        b_src = tl.load(p_idx + o_j, mask=m_j, other=0).to(tl.int64)
        b_dst = d_start + o_j
        m_move = m_j & tl.where(moves_left, b_src > b_dst, b_src < b_dst)
        o_src = _row_offsets(p_bt, b_src, m_move, s_kb, s_kt, BS)
        o_dst = _row_offsets(p_bt, b_dst, m_move, s_kb, s_kt, BS)
        if BLOCK_ROW == ROW:
            m_row = m_move[:, None]
        else:
            m_row = m_move[:, None] & (o_c < ROW)[None, :]
        b_rows = tl.load(p_cache + o_src[:, None] + o_c[None, :], mask=m_row)
        tl.debug_barrier()
        tl.store(p_cache + o_dst[:, None] + o_c[None, :], b_rows, mask=m_row)


_pointer_tables: dict[tuple, torch.Tensor] = {}


def compact_paged(
    kv_caches: torch.Tensor | list[torch.Tensor],
    block_tables: torch.Tensor,
    kept_indices: torch.Tensor,
    num_kept: torch.Tensor,
    dest_start: torch.Tensor | None = None,
) -> None:
    """Moves the kept K|V rows of every (layer, request, kv head) together, in place.

    For each layer l, request b, kv head h and j < num_kept[l, b]: the K|V row of head h at
    logical token dest_start[b] + j of request b gets the row that was at logical token
    kept_indices[l, b, h, j]. Other rows are left as they are (a kept row that a move does
    not overwrite keeps its old copy). All layers go in one launch.

    Args:
        kv_caches: the per-layer caches [num_blocks, HKV, BS, 2 * D] (same shape, strides
            and dtype; bf16, fp16 or fp32), or one layer's cache.
        block_tables: [B, max_blocks_per_req] int32.
        kept_indices: [L, B, HKV, K_max] int32/int64 (or [B, HKV, K_max] for one layer),
            sorted ascending and unique along K_max, each below the request's token count.
            Unsorted indices give undefined results (not checked: that would sync).
        num_kept: [L, B] or [B] (same for all layers) int32/int64, <= K_max; the same for
            all heads of a (layer, request).
        dest_start: [B] int32/int64, where each request's kept rows go (the engine keeps
            them block-aligned before the tokens that follow the prompt); None: 0, the
            front of the row. dest_start[b] + num_kept must fit the request's blocks.
    """
    op = "compact_paged"
    caches = [kv_caches] if isinstance(kv_caches, torch.Tensor) else list(kv_caches)
    if not caches:
        raise ValueError(f"{op}: kv_caches is empty")
    HKV, BS, D = check_kv_cache(caches[0], op)
    def layout(c: torch.Tensor) -> tuple:
        return tuple(c.shape), c.stride(), c.dtype, c.device

    for i, c in enumerate(caches[1:], start=1):
        if layout(c) != layout(caches[0]):
            raise ValueError(
                f"{op}: every layer's cache must match layer 0 in shape, strides, dtype and "
                f"device; layer {i} has {layout(c)}, layer 0 {layout(caches[0])}"
            )
    L = len(caches)
    if block_tables.ndim != 2 or block_tables.dtype != torch.int32 or block_tables.stride(-1) != 1:
        raise ValueError(
            f"{op}: block_tables must be int32 [B, max_blocks_per_req] with contiguous rows, "
            f"got {block_tables.dtype} {list(block_tables.shape)} strides {block_tables.stride()}"
        )
    B = block_tables.shape[0]
    if kept_indices.ndim == 3 and L == 1:
        kept_indices = kept_indices.unsqueeze(0)
    if kept_indices.ndim != 4:
        raise ValueError(
            f"{op}: kept_indices must be [L, B, HKV, K_max], got {list(kept_indices.shape)}"
        )
    check_index_tensor(kept_indices, "kept_indices", (L, B, HKV, kept_indices.shape[-1]), op)
    if kept_indices.stride(-1) != 1:
        kept_indices = kept_indices.contiguous()
    if num_kept.ndim == 1:
        num_kept = num_kept.expand(L, B)
    check_index_tensor(num_kept, "num_kept", (L, B), op)
    if dest_start is None:
        dest_start = _zeros(B, caches[0].device)
    check_index_tensor(dest_start, "dest_start", (B,), op)
    check_same_device(
        op, caches[0], block_tables=block_tables, kept_indices=kept_indices, num_kept=num_kept,
        dest_start=dest_start,
    )
    if B == 0 or kept_indices.shape[-1] == 0:
        return

    elem_size = caches[0].element_size()
    BLOCK_ROW = triton.next_power_of_2(2 * D)
    # ~32 KiB per chunk: each program walks its rows serially (load, barrier, store), so
    # the chunk size sets how many bytes it keeps in flight
    BLOCK_J = max(16, min(128, 32768 // (BLOCK_ROW * elem_size)))
    compact_kernel[(L * B * HKV,)](
        kv_cache_ptrs=_pointer_table(caches),
        block_tables=block_tables,
        kept_indices=kept_indices,
        num_kept=num_kept,
        dest_start=dest_start,
        s_kb=caches[0].stride(0),
        s_kh=caches[0].stride(1),
        s_kt=caches[0].stride(2),
        s_bt=block_tables.stride(0),
        s_il=kept_indices.stride(0),
        s_ib=kept_indices.stride(1),
        s_ih=kept_indices.stride(2),
        s_nl=num_kept.stride(0),
        s_nb=num_kept.stride(1),
        B=B,
        HKV=HKV,
        BS=BS,
        ROW=2 * D,
        BLOCK_J=BLOCK_J,
        BLOCK_ROW=BLOCK_ROW,
        ELEM=_BITS_DTYPE[elem_size],
        num_warps=8,
        # no software pipelining: the copy loop is a plain load-barrier-store stream
        num_stages=1,
    )


_ZEROS: dict[torch.device, torch.Tensor] = {}


def _zeros(count: int, device: torch.device) -> torch.Tensor:
    """A read-only [count] int32 zero tensor, kept per device (no allocation per call)."""
    zeros = _ZEROS.get(device)
    if zeros is None or zeros.numel() < count:
        zeros = torch.zeros(max(count, 256), dtype=torch.int32, device=device)
        _ZEROS[device] = zeros
    return zeros[:count]


def _pointer_table(caches: list[torch.Tensor]) -> torch.Tensor:
    """Device tensor of the layers' data pointers, built once per set of caches.

    MRV2 gives each layer its own allocation, so no single strided view spans the layers.
    """
    key = (caches[0].device, *(c.data_ptr() for c in caches))
    table = _pointer_tables.get(key)
    if table is None:
        if len(_pointer_tables) >= 8:
            _pointer_tables.clear()
        table = torch.tensor(key[1:], dtype=torch.int64, device=caches[0].device)
        _pointer_tables[key] = table
    return table
