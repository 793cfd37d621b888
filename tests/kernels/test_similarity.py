"""similarity_column_stats against its full-matrix reference, and the redundancy term it
feeds against GKVPolicy's (Triton interpreter on CPU, compiled on the GPU host)."""

import pytest
import torch

from judgeq_vllm.kernels import naive_similarity_column_stats, similarity_column_stats
from judgeq_vllm.policies import GKVPolicy

EPS = 1e-6


def near_duplicate_keys(num_jobs, num_kv_heads, max_rows, head_dim, dtype, gen):
    """Random keys where every fourth row is a noisy copy of an earlier one, so that many
    similarities pass the threshold (random keys alone would hardly ever)."""
    keys = torch.randn(num_jobs, num_kv_heads, max_rows, head_dim, generator=gen)
    source = torch.randint(0, max_rows, (max_rows,), generator=gen)
    copies = torch.arange(max_rows) % 4 == 0
    keys[:, :, copies] = keys[:, :, source[copies]] + 0.5 * torch.randn(keys[:, :, copies].shape, generator=gen)
    return keys.to(dtype)


@pytest.mark.parametrize("head_dim", [8, 64, 80, 128])
# fp16 (and bf16 on the GPU) keys take the 16-bit tensor-core path, fp32 keys TF32x3
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "gathered"])
def test_kernel_matches_the_reference(head_dim, dtype, layout, device):
    gen = torch.Generator().manual_seed(head_dim)
    num_rows = torch.tensor([150, 64, 1, 97])
    keys = near_duplicate_keys(4, 2, 150, head_dim, dtype, gen)
    if layout == "gathered":  # the event step's view: [J, N, H, D] gathered, transposed to [J, H, N, D]
        keys = keys.transpose(1, 2).contiguous().transpose(1, 2)
    got = similarity_column_stats(keys.to(device), num_rows.to(device), 0.5, EPS)
    want = naive_similarity_column_stats(keys, num_rows, 0.5, EPS)
    colsum, last, value = (t.cpu() for t in got)
    torch.testing.assert_close(colsum, want[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(last, want[1])
    torch.testing.assert_close(value, want[2], rtol=1e-5, atol=1e-5)
    # the data has matches to find, and padding columns are empty
    assert (want[1] >= 0).float().mean() > 0.1
    assert (last[1, :, 64:] == -1).all() and (colsum[1, :, 64:] == 0).all()


def test_redundancy_term_is_gkvs(device):
    """The batched redundancy term built on the kernel equals GKVPolicy's per request, on
    keys with many similar pairs (so sparing matters)."""
    from judgeq_vllm.vllm_adapter.gpu.gkv_scoring import _redundancy_scores

    gen = torch.Generator().manual_seed(3)
    policy = GKVPolicy()
    num_rows = torch.tensor([90, 40])
    keys = near_duplicate_keys(2, 2, 90, 64, torch.float32, gen)
    rows = torch.arange(90)
    valid = rows < num_rows[:, None]
    scored = rows < (num_rows - policy.window)[:, None]
    got = _redundancy_scores(policy, keys.to(device), valid.to(device), scored.to(device), num_rows.to(device)).cpu()
    for j, n in enumerate(num_rows.tolist()):
        want = policy.redundancy_scores(keys[j, :, :n])
        torch.testing.assert_close(got[j, :, : n - policy.window], want, rtol=1e-5, atol=1e-6)
        assert (got[j, :, n - policy.window :] == 0).all()


def test_bad_layout_is_refused(device):
    keys = torch.randn(1, 1, 24, 8, device=device).transpose(2, 3)
    with pytest.raises(ValueError, match="unit stride on head_dim"):
        similarity_column_stats(keys, torch.tensor([8], device=device), 0.5, EPS)
