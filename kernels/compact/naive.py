"""Reference for `compact_paged` in plain PyTorch: gather every kept row, then scatter."""

import torch


def naive_compact_paged(
    kv_caches: torch.Tensor | list[torch.Tensor],
    block_tables: torch.Tensor,
    kept_indices: torch.Tensor,
    num_kept: torch.Tensor,
    dest_start: torch.Tensor | None = None,
) -> None:
    """Same contract as `compact_paged`. Gathering before scattering makes overlap moot."""
    caches = [kv_caches] if isinstance(kv_caches, torch.Tensor) else list(kv_caches)
    if kept_indices.ndim == 3:
        kept_indices = kept_indices.unsqueeze(0)
    if num_kept.ndim == 1:
        num_kept = num_kept.expand(len(caches), -1)
    num_kv_heads, block_size = caches[0].shape[1], caches[0].shape[2]
    heads = torch.arange(num_kv_heads, device=caches[0].device)[:, None]
    for layer, cache in enumerate(caches):
        for b in range(block_tables.shape[0]):
            n = int(num_kept[layer, b])
            src = kept_indices[layer, b, :, :n].long()  # [HKV, n]
            start = 0 if dest_start is None else int(dest_start[b])
            dst = (start + torch.arange(n, device=cache.device)).expand(num_kv_heads, n)
            src_blocks = block_tables[b, src // block_size].long()
            dst_blocks = block_tables[b, dst // block_size].long()
            rows = cache[src_blocks, heads, src % block_size]  # [HKV, n, 2 * D], a copy
            cache[dst_blocks, heads, dst % block_size] = rows
