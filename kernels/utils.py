"""Layout and dtype checks shared by the kernel launchers."""

import functools

import torch

SUPPORTED_CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_kv_cache(kv_cache: torch.Tensor, op: str) -> tuple[int, int, int]:
    """Checks one layer's paged cache and returns ``(num_kv_heads, block_size, head_dim)``.

    The cache has vLLM's FlashAttention logical shape ``[num_blocks, HKV, BS, 2 * D]``
    with K in ``[..., :D]`` and V in ``[..., D:]``. The first three dims may have any
    strides (NHD, the default, is stride order (0, 2, 1, 3); HND is contiguous), but
    one token's K|V row must be contiguous.
    """
    if kv_cache.ndim != 4 or kv_cache.shape[-1] % 2 != 0:
        raise ValueError(
            f"{op}: the KV cache must have the logical shape "
            f"[num_blocks, num_kv_heads, block_size, 2 * head_dim], got {tuple(kv_cache.shape)}"
        )
    check_kv_cache_dtype(kv_cache.dtype, op)
    if kv_cache.stride(-1) != 1:
        raise ValueError(
            f"{op}: the K|V row of a token must be contiguous (stride 1 on the last dim), "
            f"got strides {kv_cache.stride()}"
        )
    _, num_kv_heads, block_size, two_d = kv_cache.shape
    return num_kv_heads, block_size, two_d // 2


def check_kv_cache_dtype(dtype: torch.dtype, op: str) -> None:
    if dtype in SUPPORTED_CACHE_DTYPES:
        return
    # vLLM keeps an fp8 cache (--kv-cache-dtype fp8*) as uint8 or as a float8 dtype
    if dtype in (torch.uint8, torch.int8) or (dtype.is_floating_point and dtype.itemsize == 1):
        raise NotImplementedError(
            f"{op}: fp8 KV caches (stored as {dtype}) are not supported yet; "
            "run vLLM with --kv-cache-dtype auto (bfloat16 or float16)"
        )
    raise ValueError(f"{op}: the KV cache must be bfloat16, float16 or float32, got {dtype}")


def check_index_tensor(t: torch.Tensor, name: str, shape: tuple[int, ...], op: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: `{name}` must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: `{name}` must be int32 or int64, got {t.dtype}")


def check_same_device(op: str, ref: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but the KV cache is on {ref.device}")


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; the interpreter (CPU) runs programs one by one."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
