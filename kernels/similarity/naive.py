"""Plain torch reference of ``similarity_column_stats`` (the full similarity matrix)."""

import torch


def naive_similarity_column_stats(
    keys: torch.Tensor, num_rows: torch.Tensor, threshold: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column of each (request, kv head)'s key cosine-similarity matrix.

    Args:
        keys: ``[J, H, N, D]``; request ``j``'s rows are ``[:num_rows[j])``, the rest padding.
        num_rows: ``[J]`` integer.
        threshold: similarity above which a row counts as similar.
        eps: added to each key norm before dividing.

    Returns:
        ``colsum`` ``[J, H, N]`` fp32: the sum over rows ``m != n`` of ``sim(m, n)``;
        ``last`` ``[J, H, N]`` int32: the largest row ``m != n`` with ``sim(m, n) > threshold``
        (-1: none); ``last_value`` ``[J, H, N]`` fp32: ``sim(last, n)`` (0 where none). All
        three are 0 / -1 / 0 on padding columns.
    """
    keys = keys.float()
    max_rows = keys.shape[2]
    unit = keys / (keys.norm(dim=-1, keepdim=True) + eps)
    similarity = unit @ unit.transpose(-1, -2)  # [J, H, row m, column n]
    rows = torch.arange(max_rows, device=keys.device)
    valid = rows[None, :] < num_rows[:, None].to(keys.device)  # [J, N]
    counted = valid[:, None, :, None] & valid[:, None, None, :] & (rows[:, None] != rows[None, :])
    similarity = similarity.masked_fill(~counted, 0.0)
    above = similarity > threshold
    last = torch.where(above, rows[None, None, :, None], -1).amax(dim=2)  # [J, H, N]
    last_value = similarity.gather(2, last.clamp(min=0)[:, :, None, :]).squeeze(2)
    return similarity.sum(dim=2), last.int(), torch.where(last >= 0, last_value, 0.0)
