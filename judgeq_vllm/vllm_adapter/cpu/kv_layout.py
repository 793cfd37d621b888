"""Reading and writing rows of the CPU_ATTN paged KV cache.

The cache of a layer is ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``, viewed
as ``[num_blocks, num_kv_heads, 2 * block_size, head_dim]`` and split into a K tile and a
V tile per (block, head). Inside a tile the elements are packed for the ISA kernel
(vec/vec16: K dim-major, V row-major; amx: VNNI interleaving), so rows are read through
an index map derived from vLLM's own packing op, and written back with that op.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from vllm import _custom_ops as ops


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key_cache, value_cache)`` views, as ``CPUAttentionBackendImpl.forward`` makes them."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    return kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)


@dataclass(frozen=True)
class PackedTileLayout:
    """Where row ``t``, dim ``d`` of one (block, head) tile lives, for K and for V.

    Attributes:
        key_map: ``[block_size * head_dim]`` flat offsets; ``tile.flatten()[key_map]``
            gives the tile's K rows in ``[t, d]`` order.
        value_map: the same for V.
    """

    key_map: torch.Tensor
    value_map: torch.Tensor


# bit patterns that are finite, normal numbers in bf16 and fp16, so a copy keeps them
_ID_OFFSET = 0x0400


@cache
def packed_tile_layout(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> PackedTileLayout:
    """Derives the packing by writing unique ids through ``cpu_attn_reshape_and_cache``."""
    ids = torch.arange(block_size * head_dim)
    if dtype == torch.float32:
        rows = ids.float()
    else:
        assert dtype in (torch.bfloat16, torch.float16), f"unsupported KV dtype {dtype}"
        rows = (ids + _ID_OFFSET).to(torch.int16).view(dtype)
    rows = rows.reshape(block_size, 1, head_dim).contiguous()
    cache = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = split_kv_cache(cache)
    slots = torch.arange(block_size, dtype=torch.int64)
    ops.cpu_attn_reshape_and_cache(rows, rows.clone(), key_cache, value_cache, slots, isa)

    def inverse(tile: torch.Tensor) -> torch.Tensor:
        flat = tile.reshape(-1)
        found = flat.long() if dtype == torch.float32 else flat.view(torch.int16).long() - _ID_OFFSET
        where = torch.full((block_size * head_dim,), -1, dtype=torch.long)
        where[found] = torch.arange(block_size * head_dim)
        assert bool((where >= 0).all()), f"the {isa} KV packing is not a permutation"
        return where

    return PackedTileLayout(inverse(key_cache[0, 0]), inverse(value_cache[0, 0]))


def read_rows(cache_half: torch.Tensor, block_ids: torch.Tensor, length: int, index_map: torch.Tensor) -> torch.Tensor:
    """Rows ``[0, length)`` of one request, unpacked.

    Args:
        cache_half: key or value cache ``[num_blocks, H, block_size, D]`` (packed tiles).
        block_ids: the request's blocks, ``[>= cdiv(length, block_size)]`` int64.
        index_map: the matching map of :class:`PackedTileLayout`.

    Returns:
        ``[H, length, D]``, a new tensor.
    """
    _, num_heads, block_size, head_dim = cache_half.shape
    num_blocks = -(-length // block_size)
    tiles = cache_half[block_ids[:num_blocks]].reshape(num_blocks, num_heads, block_size * head_dim)
    rows = tiles[:, :, index_map].reshape(num_blocks, num_heads, block_size, head_dim)
    return rows.permute(1, 0, 2, 3).reshape(num_heads, num_blocks * block_size, head_dim)[:, :length]


def write_rows(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    isa: str,
    k_scale: float,
    v_scale: float,
    kv_cache_dtype: str,
) -> None:
    """Writes ``[T, H, D]`` rows at ``slots`` through vLLM's packing op."""
    ops.cpu_attn_reshape_and_cache(
        keys, values, key_cache, value_cache, slots, isa, k_scale=k_scale, v_scale=v_scale, kv_cache_dtype=kv_cache_dtype
    )
