"""Column statistics of the key cosine-similarity matrix, without the matrix (Triton).

G-KV's redundancy term (``policies/gkv.py``, ``GKVPolicy.redundancy_scores``) needs, per
(request, kv head), a row's summed similarity to every other row, less, for each column,
the similarity of its most recent row above a threshold. Materialising the ``[J, H, N, N]``
matrix and masking it takes a dozen passes over memory; this kernel streams row tiles
against one tile of columns and keeps three numbers per column instead (see
``naive.py`` for the definition and ``gkv_scoring._redundancy_scores`` for how they make
the term: the matrix is symmetric, so a column's sum is its row's sum).
"""

import torch
import triton
import triton.language as tl

from ..utils import check_same_device

_BLOCK = 64


@triton.jit
def _inverse_norms(k, eps):
    k = k.to(tl.float32)
    return 1.0 / (tl.sqrt(tl.sum(k * k, axis=1)) + eps)


# rows and strides follow the step's resident counts: no specialisation on them, so a
# serving engine compiles this kernel once per head size and dtype
@triton.jit(do_not_specialize=["max_rows", "s_kj", "s_kh", "s_kn"])
def similarity_columns_kernel(
    keys,  # [J, H, N, D], unit stride on D
    num_rows,  # [J] resident rows per request
    colsum,  # [J, H, N] fp32 out
    last,  # [J, H, N] int32 out
    last_value,  # [J, H, N] fp32 out
    num_kv_heads,
    max_rows,
    s_kj: tl.int64,
    s_kh: tl.int64,
    s_kn: tl.int64,
    threshold,
    eps,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two (at least tl.dot's 16)
    BLOCK: tl.constexpr,
    EXACT_PRODUCTS: tl.constexpr,  # 16-bit keys: their products are exact in fp32
):
    i_jh, i_n = tl.program_id(0), tl.program_id(1)
    i_j = i_jh // num_kv_heads
    n_rows = tl.load(num_rows + i_j).to(tl.int32)
    base = keys + i_j * s_kj + (i_jh % num_kv_heads) * s_kh
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < n_rows
    k_n = tl.load(base + o_n[:, None] * s_kn + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
    inv_n = _inverse_norms(k_n, eps)
    b_sum = tl.zeros([BLOCK], dtype=tl.float32)
    b_last = tl.full([BLOCK], -1, dtype=tl.int32)
    b_value = tl.zeros([BLOCK], dtype=tl.float32)
    # rows in ascending tiles: a later tile's match is always the more recent row
    for start in range(0, n_rows, BLOCK):
        o_m = start + tl.arange(0, BLOCK)
        m_m = o_m < n_rows
        k_m = tl.load(base + o_m[:, None] * s_kn + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
        # cos(m, n) = (k_m . k_n) / (|k_m| |k_n|): the raw dot, then the norms, so that
        # 16-bit keys take the tensor cores in their own type (exact products, fp32 sums:
        # the reference's fp32 accuracy at a sixth of TF32x3's work); fp32 keys take three
        # TF32 products per fp32 one, about fp32's accuracy too (plain TF32 would let a
        # near-threshold similarity fall on the other side of the reference's)
        if EXACT_PRODUCTS:
            dot = tl.dot(k_m, tl.trans(k_n))
        else:
            dot = tl.dot(k_m.to(tl.float32), tl.trans(k_n.to(tl.float32)), input_precision="tf32x3")
        sim = dot * _inverse_norms(k_m, eps)[:, None] * inv_n[None, :]  # [rows, columns]
        counted = m_m[:, None] & m_n[None, :] & (o_m[:, None] != o_n[None, :])
        sim = tl.where(counted, sim, 0.0)
        b_sum += tl.sum(sim, axis=0)
        tile_last = tl.max(tl.where(sim > threshold, o_m[:, None], -1), axis=0)
        tile_value = tl.sum(tl.where(o_m[:, None] == tile_last[None, :], sim, 0.0), axis=0)
        newer = tile_last > b_last
        b_last = tl.where(newer, tile_last, b_last)
        b_value = tl.where(newer, tile_value, b_value)
    out = i_jh * max_rows + o_n
    m_out = o_n < max_rows
    tl.store(colsum + out, b_sum, mask=m_out)
    tl.store(last + out, b_last, mask=m_out)
    tl.store(last_value + out, b_value, mask=m_out)


def similarity_column_stats(
    keys: torch.Tensor, num_rows: torch.Tensor, threshold: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``naive_similarity_column_stats`` (same arguments and results) in one launch.

    ``keys`` may be any strided ``[J, H, N, D]`` view with unit stride on ``D``, in bf16,
    fp16 or fp32.
    """
    check_same_device("similarity_column_stats", keys, num_rows=num_rows)
    num_jobs, num_kv_heads, max_rows, head_dim = keys.shape
    if keys.stride(-1) != 1:
        raise ValueError(
            f"similarity_column_stats: keys need unit stride on head_dim, "
            f"got shape {tuple(keys.shape)} strides {keys.stride()}"
        )
    shape = (num_jobs, num_kv_heads, max_rows)
    colsum = torch.empty(shape, dtype=torch.float32, device=keys.device)
    last = torch.empty(shape, dtype=torch.int32, device=keys.device)
    last_value = torch.empty(shape, dtype=torch.float32, device=keys.device)
    if keys.numel():
        grid = (num_jobs * num_kv_heads, triton.cdiv(max_rows, _BLOCK))
        similarity_columns_kernel[grid](
            keys, num_rows, colsum, last, last_value, num_kv_heads, max_rows,
            keys.stride(0), keys.stride(1), keys.stride(2), float(threshold), float(eps),
            D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK=_BLOCK,
            # the interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584):
            # on CPU, bf16 keys take the fp32 path
            EXACT_PRODUCTS=keys.dtype == torch.float16 or (keys.dtype == torch.bfloat16 and keys.is_cuda),
        )
    return colsum, last, last_value
