"""G-KV's scoring and selection for every event of a step, batched over requests, on device.

``GKVPolicy.compress`` (``policies/gkv.py``) scores one request's resident rows; here the
same formulas run over ``J`` requests at once, their rows padded to the longest (``N``)
and masked: no host sync, no per-request Python. The local and global scores are plain
torch; the redundancy term's ``N x N`` key similarities are never stored: one Triton
launch (``kernels/similarity``) reduces them to three numbers per row. Each event scores
at most ``b + interval`` rows (bounded by the budget, not the sequence). A batch is any
set of independent problems: the event step (``gkv_events.py``) puts several layers' events
in one, ``(layer, request)`` pairs, as many as :func:`pairs_per_chunk` allows (the local
scores' ``[J, H, group, w, N]`` logits and the ``[J, H, N, D]`` keys stay under a bound),
so that an event step launches a few batches, not one per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...kernels import similarity_column_stats
from ...policies import GKVPolicy

# eps of the key-norm division in the authors' Triton similarity kernel (policies/gkv.py)
SIMILARITY_NORM_EPS = 1e-6
# fp32 elements of one batch's [J, Hq, w, N] local-score logits (and its softmax): 64 Mi = 256 MiB
_MAX_LOGIT_ELEMENTS = 64 * 2**20
# elements of one batch's resident keys [J, H, N, D], gathered in the model dtype and copied
# to fp32 for the local scores: 64 Mi = 128 MiB in bf16 plus 256 MiB in fp32
_MAX_KEY_ELEMENTS = 64 * 2**20


@dataclass(frozen=True)
class GKVSelection:
    """One layer's choice for ``J`` requests.

    Attributes:
        kept: ``[J, H, budget]`` int64 indices into each request's resident rows, ascending:
            the top ``budget - w`` scored rows, then the last ``w`` rows.
        global_scores: ``[J, H, budget - w]`` fp32 ``F`` of the scored kept rows, in ``kept``
            order (what the next event reads as ``previous``).
    """

    kept: torch.Tensor
    global_scores: torch.Tensor


def pairs_per_chunk(num_q_heads: int, num_kv_heads: int, head_dim: int, window: int, max_rows: int) -> int:
    """Problems (``(layer, request)`` pairs) scored in one batch so that its local-score
    logits and its keys stay under their bounds."""
    logits_per_pair = num_q_heads * window * max_rows
    keys_per_pair = num_kv_heads * max_rows * head_dim
    return max(1, min(_MAX_LOGIT_ELEMENTS // logits_per_pair, _MAX_KEY_ELEMENTS // keys_per_pair))


def select_gkv(
    policy: GKVPolicy,
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_rows: torch.Tensor,
    previous: torch.Tensor,
    has_previous: torch.Tensor,
    scale: float,
    budget: int,
) -> GKVSelection:
    """``GKVPolicy.compress`` for ``J`` independent problems at once (one per request and
    layer; "request" below).

    Args:
        queries: ``[J, w, Hq, D]`` each request's window queries, oldest first.
        keys: ``[J, H, N, D]`` resident keys (any strides, unit stride on ``D``); request
            ``j``'s are ``[:, :num_rows[j]]`` (the rest is padding, never read into a result).
        num_rows: ``[J]`` int64 resident rows, ``budget < num_rows[j] <= N``.
        previous: ``[J, H, budget - w]`` ``F`` of each request's first ``budget - w`` rows
            (read only where ``has_previous``).
        has_previous: ``[J]`` bool, whether an earlier event left ``F``.
    """
    window = policy.window
    num_jobs, num_kv_heads, max_rows, _ = keys.shape
    rows = torch.arange(max_rows, device=keys.device)
    valid = rows < num_rows[:, None]  # [J, N]
    scored = rows < (num_rows - window)[:, None]  # [J, N]: the rows before the window
    local = _local_scores(queries, keys, rows, valid, num_rows, scale, window)
    local = _normalise(local.masked_fill(~scored[:, None], 0.0))
    global_scores = _global_scores(policy, local, previous, has_previous, rows)
    redundancy = _redundancy_scores(policy, keys, valid, scored, num_rows)
    final = policy.mix_lambda * global_scores - (1.0 - policy.mix_lambda) * redundancy
    final = final.masked_fill(~scored[:, None], float("-inf"))
    top = final.topk(budget - window, dim=-1).indices.sort(dim=-1).values
    window_rows = (num_rows - window)[:, None] + torch.arange(window, device=keys.device)
    kept = torch.cat([top, window_rows[:, None, :].expand(-1, num_kv_heads, -1)], dim=-1)
    return GKVSelection(kept, global_scores.gather(-1, top))


def _local_scores(queries, keys, rows, valid, num_rows, scale: float, window: int) -> torch.Tensor:
    """``S`` before normalisation: mean over the window of the group max of the softmax
    attention, ``[J, H, N]`` (only the scored rows are meaningful)."""
    num_jobs, _, num_q_heads, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    group = num_q_heads // num_kv_heads
    # [J, kv_head, group, window, D]: query head q belongs to kv head q // group
    grouped = queries.float().permute(0, 2, 1, 3).reshape(num_jobs, num_kv_heads, group, window, head_dim)
    # one fp32 copy of the keys, scaled in place (a copy even of fp32 keys: the redundancy
    # term reads them after)
    logits = torch.einsum("jhgqd,jhnd->jhgqn", grouped, keys.to(torch.float32, copy=True).mul_(scale))
    # the window queries are the last rows: row n is window row n - (num_rows - w), which
    # query q sees only if it is not after q
    in_window = rows[None, :] - (num_rows - window)[:, None]  # [J, N]
    hidden = ~valid[:, None, :] | (in_window[:, None, :] > torch.arange(window, device=keys.device)[None, :, None])
    logits = logits.masked_fill(hidden[:, None, None], float("-inf"))
    return torch.softmax(logits, dim=-1).amax(dim=2).mean(dim=2)


def _global_scores(policy: GKVPolicy, local, previous, has_previous, rows) -> torch.Tensor:
    """``F = max(alpha * F_prev, S)`` on the first ``budget - w`` rows of requests with a
    previous score; ``F = S`` elsewhere (``max(alpha * S, S) = S`` for ``S >= 0``)."""
    carried = previous.shape[-1]
    padded = torch.nn.functional.pad(previous.float(), (0, local.shape[-1] - carried))
    has = has_previous[:, None] & (rows < carried)[None, :]  # [J, N]
    return torch.where(has[:, None], torch.maximum(policy.alpha * padded, local), local)


def _redundancy_scores(policy: GKVPolicy, keys, valid, scored, num_rows) -> torch.Tensor:
    """``R`` (``GKVPolicy.redundancy_scores``) over each request's own rows, ``[J, H, N]``."""
    stats = similarity_column_stats(keys, num_rows, policy.similarity_threshold, SIMILARITY_NORM_EPS)
    summed = spared_row_sums(*stats) / num_rows[:, None, None]
    redundancy = torch.softmax(summed.masked_fill(~valid[:, None], float("-inf")), dim=-1)
    return _normalise(redundancy.masked_fill(~scored[:, None], 0.0))


def spared_row_sums(colsum: torch.Tensor, last: torch.Tensor, last_value: torch.Tensor) -> torch.Tensor:
    """Each row's summed similarity to the other rows, less its entries that some column
    spares (the column's most recent row above the threshold), from the column statistics
    of ``similarity_column_stats``: the matrix is symmetric, so row ``m``'s sum is column
    ``m``'s, and column ``n`` spares ``last_value[n]`` from row ``last[n]``."""
    spared = torch.where(last >= 0, last_value, 0.0)
    return colsum - torch.zeros_like(colsum).scatter_add_(-1, last.clamp(min=0).long(), spared)


def _normalise(scores: torch.Tensor) -> torch.Tensor:
    """Divides each (request, kv head)'s scores by their max (zeros stay zeros)."""
    return scores / scores.amax(dim=-1, keepdim=True)
