"""Reference for `score_paged` in plain PyTorch: gather the keys, softmax, sum."""

import torch
import torch.nn.functional as F


def naive_score_paged(
    queries: torch.Tensor,
    query_start_loc: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    key_lens: torch.Tensor,
    num_candidates: torch.Tensor,
    scale: float,
    pool_kernel: int = 1,
) -> torch.Tensor:
    """Same contract as `score_paged`, one request at a time, in fp32."""
    _, num_kv_heads, block_size, two_d = kv_cache.shape
    head_dim = two_d // 2
    group = queries.shape[1] // num_kv_heads
    starts, key_lens, num_candidates = (
        query_start_loc.tolist(), key_lens.tolist(), num_candidates.tolist()
    )
    batch = len(key_lens)
    scores = torch.full(
        (batch, num_kv_heads, max(num_candidates, default=0)), float("-inf"),
        dtype=torch.float32, device=kv_cache.device,
    )
    for b in range(batch):
        q = queries[starts[b] : starts[b + 1]].float()  # [n_obs, HQ, D]
        n_obs, key_len, n_cand = q.shape[0], key_lens[b], num_candidates[b]
        t = torch.arange(key_len, device=kv_cache.device)
        blocks = block_tables[b, t // block_size].long()
        k = kv_cache[blocks, :, t % block_size, :head_dim].float()  # [T, HKV, D]
        k = k.repeat_interleave(group, dim=1)  # [T, HQ, D]
        logits = torch.einsum("ihd,thd->hit", q, k) * scale  # [HQ, n_obs, T]
        # obs query i is at position key_len - n_obs + i and sees the keys up to it
        pos = key_len - n_obs + torch.arange(n_obs, device=kv_cache.device)
        logits = logits.masked_fill(t[None, :] > pos[:, None], float("-inf"))
        probs = logits.softmax(dim=-1)
        s = probs.sum(dim=1).view(num_kv_heads, group, key_len).sum(dim=1)[:, :n_cand]
        if pool_kernel > 1 and n_cand > 0:
            s = F.max_pool1d(s, pool_kernel, stride=1, padding=pool_kernel // 2)
        scores[b, :, :n_cand] = s
    return scores
