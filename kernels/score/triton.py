"""Soft-query scoring over a paged KV cache (Triton).

NOTE on the algorithm: a key's score needs the softmax denominator of every observation
row, and that denominator covers all visible keys, so the keys are read twice.
1. `score_stats_kernel`, split-K: each program takes a chunk of one request's keys for
   one kv head and keeps, per observation row (obs query i, query head g of the group),
   an online max and sum of exp2 over the chunk.
2. `score_kernel`, split-K over the candidate keys: each program first folds the per-chunk
   partials of its rows into one log-sum-exp (they are small and in L2, and this saves a
   launch), then sums exp2(logit - lse) over the rows of the group, i.e. over obs queries
   and query heads.
3. `score_pool_kernel` (pool_kernel > 1 only): max-pool over the candidate range.
All logits are in base 2 (scaled by log2(e)) so the exponentials are exp2.
Chunking over keys gives batch 1 with 8 kv heads enough programs to fill the GPU.

Only tile shapes are compile-time constants; the chunk length and count, which the
launcher picks per problem, are runtime values. A serving engine thus compiles each
kernel once per tile shape (at its warm-up) and never in the middle of a step.
"""

import functools
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..utils import check_index_tensor, check_kv_cache, check_same_device, num_sms

LOG2E = 1.4426950408889634
# chunks' partial stats merged per load in the score pass
MERGE_CHUNKS = tl.constexpr(32)


@triton.jit
def _load_obs_queries(
    q,  # [total_obs, HQ, D]
    bos,
    n_obs,
    key_len,
    i_h,
    i_m,
    s_qt: tl.int64,
    s_qh: tl.int64,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # row r of the tile is obs query r // G seen through query head i_h * G + r % G
    o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_i = o_r // G
    o_d = tl.arange(0, BLOCK_D)
    m_r = o_i < n_obs
    p_q = q + (bos + o_i)[:, None] * s_qt + (i_h * G + o_r % G)[:, None] * s_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & (o_d < D)[None, :], other=0.0)
    # obs query i sits at position key_len - n_obs + i and sees keys up to there
    b_lim = key_len - n_obs + o_i
    return o_r, m_r, b_q, b_lim


@triton.jit
def _load_keys(
    kv_cache,  # [num_blocks, HKV, BS, 2 * D]
    p_bt,  # [max_blocks_per_req] block table row of the request
    i_h,
    o_t,
    m_t,
    s_kb: tl.int64,
    s_kh: tl.int64,
    s_kt: tl.int64,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,
):
    o_d = tl.arange(0, BLOCK_D)
    if MASKED:
        b_blk = tl.load(p_bt + o_t // BS, mask=m_t, other=0).to(tl.int64)
    else:
        b_blk = tl.load(p_bt + o_t // BS).to(tl.int64)
    p_k = kv_cache + b_blk[:, None] * s_kb + i_h * s_kh + (o_t % BS)[:, None] * s_kt + o_d[None, :]
    if MASKED:
        b_k = tl.load(p_k, mask=m_t[:, None] & (o_d < D)[None, :], other=0.0)
    elif BLOCK_D == D:
        b_k = tl.load(p_k)
    else:
        b_k = tl.load(p_k, mask=(o_d < D)[None, :], other=0.0)
    return b_k


@triton.jit
def _online_softmax_update(b_qk, b_m, b_l, qk_scale):
    # b_qk is the unscaled q.k: the max is taken before scaling (qk_scale > 0) so that the
    # exponent below is a single fma per logit
    b_m_new = tl.maximum(b_m, tl.max(b_qk, 1) * qk_scale)
    # a row that has seen no visible key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
    b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_p = tl.exp2(b_qk * qk_scale - b_shift[:, None])
    b_l = b_l * tl.exp2(b_m - b_shift) + tl.sum(b_p, 1)
    return b_m_new, b_l


@triton.jit(do_not_specialize=["NC"])
def score_stats_kernel(
    q,  # [total_obs, HQ, D]
    query_start_loc,  # [B + 1]
    kv_cache,  # [num_blocks, HKV, BS, 2 * D]
    block_tables,  # [B, max_blocks_per_req]
    key_lens,  # [B]
    part,  # [B, HKV, NC, 2, M_PAD] fp32: per chunk, row max of the base-2 logits, then
    # row sum of exp2(logit - max)
    qk_scale,
    s_qt: tl.int64,
    s_qh: tl.int64,
    s_kb: tl.int64,
    s_kh: tl.int64,
    s_kt: tl.int64,
    s_bt: tl.int64,
    NC,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    chunk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_M_TILES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    bos = tl.load(query_start_loc + i_b).to(tl.int64)
    n_obs = tl.load(query_start_loc + i_b + 1).to(tl.int64) - bos
    key_len = tl.load(key_lens + i_b).to(tl.int64)
    t_start = i_c * chunk
    if t_start >= key_len:
        return
    t_end = tl.minimum(t_start + chunk, key_len)
    # keys before key_len - n_obs + 1 are visible to every obs row: their tiles need no mask
    t_full = tl.minimum(t_end, key_len - n_obs + 1)
    t_split = t_start + tl.maximum(t_full - t_start, 0) // BLOCK_N * BLOCK_N
    p_bt = block_tables + i_b * s_bt
    p_part = part + ((i_b * HKV + i_h) * NC + i_c) * (2 * NUM_M_TILES * BLOCK_M)

    # rows past n_obs * G load zero queries and get garbage stats that the score pass ignores
    for i_m in range(NUM_M_TILES):
        o_r, m_r, b_q, b_lim = _load_obs_queries(
            q, bos, n_obs, key_len, i_h, i_m, s_qt, s_qh, G, D, BLOCK_M, BLOCK_D
        )
        b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        b_l = tl.zeros([BLOCK_M], tl.float32)
        for t0 in range(t_start, t_split, BLOCK_N):
            o_t = t0 + tl.arange(0, BLOCK_N)
            b_k = _load_keys(
                kv_cache, p_bt, i_h, o_t, None, s_kb, s_kh, s_kt, D, BS, BLOCK_D, False
            )
            b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
            b_m, b_l = _online_softmax_update(b_qk, b_m, b_l, qk_scale)
        for t0 in range(t_split, t_end, BLOCK_N):
            o_t = t0 + tl.arange(0, BLOCK_N)
            m_t = o_t < t_end
            b_k = _load_keys(
                kv_cache, p_bt, i_h, o_t, m_t, s_kb, s_kh, s_kt, D, BS, BLOCK_D, True
            )
            b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
            # b_lim < key_len for valid rows, so this also drops the keys past t_end
            b_qk = tl.where(o_t[None, :] <= b_lim[:, None], b_qk, float("-inf"))
            b_m, b_l = _online_softmax_update(b_qk, b_m, b_l, qk_scale)
        tl.store(p_part + o_r, b_m)
        tl.store(p_part + NUM_M_TILES * BLOCK_M + o_r, b_l)


@triton.jit
def _merge_lse(
    p_part,  # [NC, 2, M_PAD] fp32 per-chunk row stats of (request, kv head)
    o_r,
    n_chunks,
    M_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # base-2 log-sum-exp of rows o_r over all chunks of the request; the merge is the
    # stable one of online softmax, BLOCK_C chunks per step so the loads go out together
    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = (o_c < n_chunks)[:, None]
        p_c = p_part + o_c[:, None] * (2 * M_PAD) + o_r[None, :]
        b_mc = tl.load(p_c, mask=m_c, other=float("-inf"))
        b_lc = tl.load(p_c + M_PAD, mask=m_c, other=0.0)
        b_m_new = tl.maximum(b_m, tl.max(b_mc, 0))
        # rows with no visible key so far keep m = -inf: shift by 0 so exp2 gives 0, not NaN
        b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_l = b_l * tl.exp2(b_m - b_shift) + tl.sum(b_lc * tl.exp2(b_mc - b_shift[None, :]), 0)
        b_m = b_m_new
    return tl.where(b_m == float("-inf"), 0.0, b_m) + tl.log2(b_l)


@triton.jit
def _tile_mass(
    b_k, b_q, b_lse, b_lim, o_t, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    # keys along the rows of the product: the sum over obs rows then stays within a thread
    # quad instead of crossing warps through shared memory
    b_qk = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)
    if MASKED:
        b_qk = tl.where(o_t[:, None] <= b_lim[None, :], b_qk, float("-inf"))
    return tl.sum(tl.exp2(b_qk * qk_scale - b_lse[None, :]), 1)


@triton.jit(do_not_specialize=["NC", "s_sb", "s_sh", "T_OUT"])
def score_kernel(
    q,  # [total_obs, HQ, D]
    query_start_loc,  # [B + 1]
    kv_cache,  # [num_blocks, HKV, BS, 2 * D]
    block_tables,  # [B, max_blocks_per_req]
    key_lens,  # [B]
    num_candidates,  # [B]
    part,  # [B, HKV, NC, 2, M_PAD] fp32, from score_stats_kernel
    scores,  # [B, HKV, T_OUT] fp32, T_OUT = max(num_candidates)
    qk_scale,
    s_qt: tl.int64,
    s_qh: tl.int64,
    s_kb: tl.int64,
    s_kh: tl.int64,
    s_kt: tl.int64,
    s_bt: tl.int64,
    s_sb: tl.int64,
    s_sh: tl.int64,
    NC,
    T_OUT,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    chunk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_M_TILES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # everything in the reverse order of the stats pass (programs, and key tiles within a
    # chunk): the keys it read last are the likeliest to still be in L2. With one wave of
    # programs (batch 1) those are the last tiles of every chunk.
    i_c = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
    i_h = (tl.num_programs(1) - 1 - tl.program_id(1)).to(tl.int64)
    i_b = (tl.num_programs(2) - 1 - tl.program_id(2)).to(tl.int64)
    bos = tl.load(query_start_loc + i_b).to(tl.int64)
    n_obs = tl.load(query_start_loc + i_b + 1).to(tl.int64) - bos
    key_len = tl.load(key_lens + i_b).to(tl.int64)
    n_cand = tl.load(num_candidates + i_b).to(tl.int64)
    t_start = i_c * chunk
    t_end = tl.minimum(t_start + chunk, T_OUT)
    t_stop = tl.minimum(t_end, n_cand)
    t_full = tl.minimum(t_stop, key_len - n_obs + 1)
    # [t_start, t_split): unmasked tiles; [t_split, t_fill): tiles holding the causal
    # diagonal or the end of the candidates; [t_fill, t_end): no candidate, -inf only
    t_split = t_start + tl.maximum(t_full - t_start, 0) // BLOCK_N * BLOCK_N
    t_fill = t_start + tl.cdiv(tl.maximum(t_stop - t_start, 0), BLOCK_N) * BLOCK_N
    p_bt = block_tables + i_b * s_bt
    p_part = part + (i_b * HKV + i_h) * NC * (2 * NUM_M_TILES * BLOCK_M)
    p_s = scores + i_b * s_sb + i_h * s_sh

    for t0 in range(t_fill, t_end, BLOCK_N):
        o_t = t0 + tl.arange(0, BLOCK_N)
        tl.store(p_s + o_t, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=o_t < t_end)
    # one row tile at a time (one for n_obs * G <= BLOCK_M): its queries and lse stay in
    # registers for the whole chunk; later tiles re-read the chunk's keys (from L2) and add
    # to what the earlier ones stored
    for i_m in range(NUM_M_TILES):
        o_r, m_r, b_q, b_lim = _load_obs_queries(
            q, bos, n_obs, key_len, i_h, i_m, s_qt, s_qh, G, D, BLOCK_M, BLOCK_D
        )
        b_lse = _merge_lse(
            p_part, o_r, tl.cdiv(key_len, chunk), NUM_M_TILES * BLOCK_M, BLOCK_M, MERGE_CHUNKS
        )
        # padding rows get lse = +inf, so exp2(logit - lse) = 0 drops them
        b_lse = tl.where(m_r, b_lse, float("inf"))
        if NUM_M_TILES > 1:
            # the earlier tile's stores, made by other threads, must be visible to the loads
            tl.debug_barrier()
        for t0 in range(t_split, t_fill, BLOCK_N):
            o_t = t0 + tl.arange(0, BLOCK_N)
            m_t = o_t < t_stop
            b_k = _load_keys(
                kv_cache, p_bt, i_h, o_t, m_t, s_kb, s_kh, s_kt, D, BS, BLOCK_D, True
            )
            b_acc = _tile_mass(b_k, b_q, b_lse, b_lim, o_t, qk_scale, True, DOT_PRECISION)
            if NUM_M_TILES > 1:
                b_acc += tl.load(p_s + o_t, mask=m_t & (i_m > 0), other=0.0)
            tl.store(p_s + o_t, tl.where(m_t, b_acc, float("-inf")), mask=o_t < t_end)
        for i_t in range((t_split - t_start) // BLOCK_N):
            o_t = t_split - (i_t + 1) * BLOCK_N + tl.arange(0, BLOCK_N)
            b_k = _load_keys(
                kv_cache, p_bt, i_h, o_t, None, s_kb, s_kh, s_kt, D, BS, BLOCK_D, False
            )
            b_acc = _tile_mass(b_k, b_q, b_lse, b_lim, o_t, qk_scale, False, DOT_PRECISION)
            if NUM_M_TILES > 1:
                b_acc += tl.load(p_s + o_t, mask=(o_t < t_end) & (i_m > 0), other=0.0)
            tl.store(p_s + o_t, b_acc)


@triton.jit(do_not_specialize=["s_sb", "s_sh", "T_OUT"])
def score_pool_kernel(
    raw,  # [B, HKV, T_OUT] fp32, same strides as scores
    scores,  # [B, HKV, T_OUT] fp32
    num_candidates,  # [B]
    s_sb: tl.int64,
    s_sh: tl.int64,
    T_OUT,
    POOL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    n_cand = tl.load(num_candidates + i_b).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    p_off = i_b * s_sb + i_h * s_sh
    b_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    for i_w in tl.static_range(POOL):
        o_src = o_t + (i_w - POOL // 2)
        # -inf padding at both ends of the candidate range, as F.max_pool1d pads
        m_src = (o_src >= 0) & (o_src < n_cand)
        b_max = tl.maximum(b_max, tl.load(raw + p_off + o_src, mask=m_src, other=float("-inf")))
    tl.store(scores + p_off + o_t, tl.where(o_t < n_cand, b_max, float("-inf")), mask=o_t < T_OUT)


@dataclass(frozen=True)
class ScoreConfig:
    """Launch parameters of `score_paged`.

    Args:
        chunk: keys per program along the split-K axis, a multiple of `block_n`;
            None picks the power of two in [4 * block_n, 4096] with the fewest waves of
            programs times keys per program (see `resolved`).
        block_m: most observation rows (n_obs * G) in one tile; more rows use several tiles.
        block_n: keys per tile; None picks 128 for more than 16K keys in the batch (and a
            chunk that allows it), else 64 (see `resolved`).
        num_warps: warps per program.
        num_stages: software-pipelining depth of the key loads.
    """

    chunk: int | None = None
    block_m: int = 128
    block_n: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def resolved(
        self, batch: int, num_kv_heads: int, max_key_len: int, device: torch.device
    ) -> "ScoreConfig":
        """This config with `block_n` and `chunk` filled in for the given problem."""
        if self.block_n is None:
            # H100, Llama-3.1-8B heads: 128-key tiles keep more bytes in flight per program,
            # 10-20% faster from 32K keys at batch 1 and from 8K at batch 16, but 12% slower
            # at 8K, batch 1, where the chunk grows past what fills the GPU
            big = batch * max_key_len > 16384 and (self.chunk is None or self.chunk % 128 == 0)
            return replace(self, block_n=128 if big else 64).resolved(batch, num_kv_heads, max_key_len, device)
        if self.block_m < 16 or self.block_n < 16:
            raise ValueError(f"score_paged: tl.dot needs tiles of at least 16, got {self}")
        if self.chunk is not None:
            if self.chunk % self.block_n != 0:
                raise ValueError(
                    f"score_paged: chunk={self.chunk} must be a multiple of block_n={self.block_n}"
                )
            return self
        # two programs of the default tiles run side by side on an SM; a program costs its
        # keys plus about four tiles' worth (query load, partial stats, pipeline fill).
        # Batch 1 needs the split over keys to fill the GPU; one full wave beats a ragged
        # second one. On H100 this picks the measured best chunk at 8K-128K, batch 1 and 16.
        slots = 2 * num_sms(device)
        best, best_cost = None, None
        chunk = 4 * self.block_n
        while chunk <= 4096:
            programs = batch * num_kv_heads * math.ceil(max_key_len / chunk)
            cost = math.ceil(programs / slots) * (chunk + 4 * self.block_n)
            if best_cost is None or cost <= best_cost:
                best, best_cost = chunk, cost
            chunk *= 2
        return replace(self, chunk=best)


def score_paged(
    queries: torch.Tensor,
    query_start_loc: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    key_lens: torch.Tensor,
    num_candidates: torch.Tensor,
    scale: float,
    pool_kernel: int = 1,
    *,
    max_num_obs: int | None = None,
    max_key_len: int | None = None,
    max_num_candidates: int | None = None,
    config: ScoreConfig | None = None,
) -> torch.Tensor:
    """Per-kv-head attention mass that the observation queries put on each candidate key.

    score[b, h, t] = sum over obs queries i of request b and query heads g of group h of
    softmax_t(scale * q[i, g] . k[t]) with the softmax over the keys visible to query i
    (causal: query i sits at position key_len - n_obs + i), read from the paged cache.

    Args:
        queries: [total_obs, HQ, D], post-RoPE, packed over requests. They are rounded
            to the cache dtype (as attention does) before the product.
        query_start_loc: [B + 1] int, request b owns queries[qsl[b]:qsl[b + 1]] (>= 1 each).
        kv_cache: [num_blocks, HKV, BS, 2 * D] one layer's cache, bf16/fp16/fp32.
        block_tables: [B, max_blocks_per_req] int32.
        key_lens: [B] keys present in the cache for each request (the obs queries are
            the last n_obs of them).
        num_candidates: [B] keys [0, num_candidates) are scored, num_candidates <= key_len.
        scale: softmax scale, usually head_dim ** -0.5.
        pool_kernel: 1, or an odd k for a stride-1 max-pool over the candidate range.
        max_num_obs / max_key_len / max_num_candidates: host-side maxima; when all three
            are given the launcher neither syncs with the device nor validates lengths.
        config: launch parameters (tests and benchmarks); None uses the heuristics.

    Returns:
        [B, HKV, max(num_candidates)] fp32, -inf past each request's num_candidates.
    """
    op = "score_paged"
    HKV, BS, D = check_kv_cache(kv_cache, op)
    if queries.ndim != 3 or queries.shape[2] != D or queries.shape[1] % HKV != 0:
        raise ValueError(
            f"{op}: queries must be [total_obs, HQ, {D}] with HQ a multiple of "
            f"num_kv_heads={HKV}, got {list(queries.shape)}"
        )
    queries = queries.to(kv_cache.dtype)
    if queries.stride(-1) != 1:
        raise ValueError(
            f"{op}: queries must be contiguous along head_dim, got strides {queries.stride()}"
        )
    if block_tables.ndim != 2 or block_tables.dtype != torch.int32:
        raise ValueError(
            f"{op}: block_tables must be int32 [B, max_blocks_per_req], "
            f"got {block_tables.dtype} {list(block_tables.shape)}"
        )
    if block_tables.stride(-1) != 1:
        raise ValueError(
            f"{op}: block_tables rows must be contiguous, got strides {block_tables.stride()}"
        )
    B = block_tables.shape[0]
    check_index_tensor(query_start_loc, "query_start_loc", (B + 1,), op)
    check_index_tensor(key_lens, "key_lens", (B,), op)
    check_index_tensor(num_candidates, "num_candidates", (B,), op)
    check_same_device(
        op, kv_cache, queries=queries, query_start_loc=query_start_loc,
        block_tables=block_tables, key_lens=key_lens, num_candidates=num_candidates,
    )
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"{op}: pool_kernel must be 1 (no pooling) or odd, got {pool_kernel}")
    if None in (max_num_obs, max_key_len, max_num_candidates):
        max_num_obs, max_key_len, max_num_candidates = _checked_maxima(
            query_start_loc, key_lens, num_candidates, block_tables.shape[1] * BS
        )

    device = kv_cache.device
    scores = torch.empty(B, HKV, max_num_candidates, dtype=torch.float32, device=device)
    if B == 0 or max_num_candidates == 0:
        return scores
    plan = _launch_plan(
        config or ScoreConfig(), B, HKV, queries.shape[1] // HKV, D, BS, max_num_obs,
        max_key_len, max_num_candidates, kv_cache.dtype, device,
    )
    # the per-chunk row stats live only between the two launches
    part = torch.empty(plan.part_numel, dtype=torch.float32, device=device)
    qk_scale = scale * LOG2E
    s_qt, s_qh, _ = queries.stride()
    s_kb, s_kh, s_kt, _ = kv_cache.stride()
    strides = dict(s_qt=s_qt, s_qh=s_qh, s_kb=s_kb, s_kh=s_kh, s_kt=s_kt, s_bt=block_tables.stride(0))
    score_stats_kernel[plan.stats_grid](
        q=queries, query_start_loc=query_start_loc, kv_cache=kv_cache, block_tables=block_tables,
        key_lens=key_lens, part=part, qk_scale=qk_scale, NC=plan.num_chunks, HKV=HKV,
        **strides, **plan.meta,
    )
    raw = scores if pool_kernel == 1 else torch.empty_like(scores)
    score_kernel[plan.score_grid](
        q=queries, query_start_loc=query_start_loc, kv_cache=kv_cache, block_tables=block_tables,
        key_lens=key_lens, num_candidates=num_candidates, part=part, scores=raw,
        qk_scale=qk_scale, s_sb=raw.stride(0), s_sh=raw.stride(1), NC=plan.num_chunks,
        T_OUT=max_num_candidates, HKV=HKV, **strides, **plan.meta,
    )
    if pool_kernel > 1:
        BLOCK_T = 1024
        score_pool_kernel[(triton.cdiv(max_num_candidates, BLOCK_T), HKV, B)](
            raw=raw, scores=scores, num_candidates=num_candidates, s_sb=scores.stride(0),
            s_sh=scores.stride(1), T_OUT=max_num_candidates, POOL=pool_kernel, BLOCK_T=BLOCK_T,
        )
    return scores


class _LaunchPlan(NamedTuple):
    num_chunks: int
    part_numel: int
    stats_grid: tuple[int, int, int]
    score_grid: tuple[int, int, int]
    meta: dict


@functools.lru_cache(maxsize=256)
def _launch_plan(
    config: ScoreConfig,
    B: int,
    HKV: int,
    G: int,
    D: int,
    BS: int,
    max_num_obs: int,
    max_key_len: int,
    max_num_candidates: int,
    dtype: torch.dtype,
    device: torch.device,
) -> _LaunchPlan:
    """Grids, tile sizes and workspace size of one problem; cached, since the engine calls
    with the same shapes for every layer and the launcher's host time counts at batch 1."""
    cfg = config.resolved(B, HKV, max_key_len, device)
    BLOCK_M = min(cfg.block_m, max(16, triton.next_power_of_2(max_num_obs * G)))
    NUM_M_TILES = triton.cdiv(max_num_obs * G, BLOCK_M)
    NC = triton.cdiv(max_key_len, cfg.chunk)
    meta = dict(
        G=G, D=D, BS=BS, chunk=cfg.chunk, BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n,
        BLOCK_D=triton.next_power_of_2(D), NUM_M_TILES=NUM_M_TILES,
        # fp32 caches (CPU tests) get an exact dot; 16-bit inputs are exact in any mode
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return _LaunchPlan(
        num_chunks=NC,
        part_numel=B * HKV * NC * 2 * NUM_M_TILES * BLOCK_M,
        stats_grid=(NC, HKV, B),
        score_grid=(triton.cdiv(max_num_candidates, cfg.chunk), HKV, B),
        meta=meta,
    )


def _checked_maxima(
    query_start_loc: torch.Tensor,
    key_lens: torch.Tensor,
    num_candidates: torch.Tensor,
    max_keys: int,
) -> tuple[int, int, int]:
    """Host-side maxima and a length check, in one device sync."""
    n_obs = (query_start_loc[1:] - query_start_loc[:-1]).long()
    if n_obs.numel() == 0:
        return 0, 0, 0
    key_lens, num_candidates = key_lens.long(), num_candidates.long()
    bad = (
        (n_obs < 1) | (n_obs > key_lens) | (num_candidates < 0)
        | (num_candidates > key_lens) | (key_lens > max_keys)
    )
    max_obs, max_len, max_cand, n_bad = torch.stack(
        [n_obs.max(), key_lens.max(), num_candidates.max(), bad.sum()]
    ).tolist()
    if n_bad:
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"score_paged: every request needs 1 <= n_obs <= key_len, "
            f"0 <= num_candidates <= key_len and key_len <= max_blocks_per_req * block_size "
            f"= {max_keys}; requests {rows} break it (n_obs={n_obs[rows].tolist()}, "
            f"key_lens={key_lens[rows].tolist()}, num_candidates={num_candidates[rows].tolist()})"
        )
    return max_obs, max_len, max_cand
