"""`compact_paged` against `naive_compact_paged`: bit-exact, overlapping moves included."""

import pytest
import torch

from judgeq_vllm.kernels import compact_paged, naive_compact_paged


def random_kept(num_tokens, num_layers, num_kv_heads, k_max, device, sinks=4, window=8):
    """Per (layer, request, head): sorted unique indices with forced sinks and window.

    Returns kept [L, B, HKV, k_max] int32 and num_kept [L, B]; entries past num_kept are
    garbage (-7) that the kernel must not read.
    """
    B = len(num_tokens)
    kept = torch.full((num_layers, B, num_kv_heads, k_max), -7, dtype=torch.int32)
    num_kept = torch.zeros(num_layers, B, dtype=torch.int32)
    for b, n in enumerate(num_tokens):
        keep = min(n, k_max)
        score = torch.rand(num_layers, num_kv_heads, n)
        score[..., :sinks] = 2
        score[..., max(0, n - window) :] = 2
        idx = score.topk(keep, dim=-1).indices.sort(dim=-1).values
        kept[:, b, :, :keep] = idx.int()
        num_kept[:, b] = keep
    return kept.to(device), num_kept.to(device)


def check(caches, block_tables, kept, num_kept, dest_start=None):
    layers = caches if isinstance(caches, list) else [caches]
    expected = [c.clone() for c in layers]
    naive_compact_paged(expected if isinstance(caches, list) else expected[0], block_tables, kept, num_kept, dest_start)
    compact_paged(caches, block_tables, kept, num_kept, dest_start)
    bits = torch.int16 if layers[0].element_size() == 2 else torch.int32
    for got, ref in zip(layers, expected):
        # compare bits: the kernel must copy, not convert
        assert torch.equal(got.view(bits), ref.view(bits))


@pytest.mark.parametrize(
    "HKV,D,BS,dtype,layout",
    [
        pytest.param(HKV, D, BS, dtype, layout, id=f"H{HKV}-D{D}-BS{BS}-{str(dtype)[6:]}-{layout}")
        for HKV, D, BS, dtype, layout in [
            (1, 64, 16, torch.float32, "NHD"),
            (2, 128, 32, torch.float32, "HND"),
            (8, 64, 32, torch.bfloat16, "NHD"),
            (2, 128, 16, torch.float16, "padded"),
            (4, 128, 16, torch.bfloat16, "HND"),
            (2, 96, 16, torch.bfloat16, "NHD"),
        ]
    ],
)
def test_compact_paged(paged_cache, device, HKV, D, BS, dtype, layout):
    torch.manual_seed(0)
    lens = [1000, 63, 200]
    caches, bt = paged_cache(lens, HKV, D, BS, dtype, device, layout, num_layers=3)
    kept, num_kept = random_kept(lens, 3, HKV, 96, device)
    check(caches, bt, kept, num_kept)


def test_compact_paged_overlaps(paged_cache, device):
    """Adversarial overlaps: every destination is the source of the previous row."""
    torch.manual_seed(0)
    lens, HKV, K = [300, 300, 300, 300, 150], 3, 200
    caches, bt = paged_cache(lens, HKV, 64, 16, torch.bfloat16, device, num_layers=2)
    kept = torch.zeros(2, len(lens), HKV, K, dtype=torch.int64)
    j = torch.arange(K)
    for l in range(2):
        for h in range(HKV):
            kept[l, 0, h] = j + 1 + h  # shift by one to three: each chunk overlaps itself
            kept[l, 1, h] = j  # identity: nothing moves
            kept[l, 2, h] = j + 100  # the last K tokens: sources overlap later destinations
            kept[l, 3, h] = torch.where(j < 4, j, j + 37 * (l + 1))  # sinks kept, then a jump
            kept[l, 4, h] = j + (h + 1) * (j >= 10)  # in place, then one-row shifts
    num_kept = torch.tensor([K, K, K, K, 140])
    kept[:, 4].clamp_(max=149)
    check(caches, bt, kept.to(device), num_kept.to(device))


def test_compact_paged_dest_start_as_the_engine_places_rows(paged_cache, device):
    """Kept rows go to [S, S + k) with S block aligned, as the engine lays them out: early
    kept tokens (sinks) move right, late ones left."""
    torch.manual_seed(0)
    lens, HKV, BS, K = [1000, 63, 200, 333], 2, 16, 96
    caches, bt = paged_cache(lens, HKV, 64, BS, torch.bfloat16, device, num_layers=3)
    kept, num_kept = random_kept(lens, 3, HKV, K, device)
    start = torch.tensor([(n - min(n, K)) // BS * BS for n in lens], dtype=torch.int32, device=device)
    assert int(start[0]) > 0
    check(caches, bt, kept, num_kept, start)


def test_compact_paged_dest_start_overlaps(paged_cache, device):
    """Adversarial right moves (each destination is the source of a later row) and both
    directions in one row."""
    torch.manual_seed(0)
    lens, HKV, K = [400, 400, 400, 400], 2, 200
    caches, bt = paged_cache(lens, HKV, 64, 16, torch.float32, device, num_layers=2)
    kept = torch.zeros(2, len(lens), HKV, K, dtype=torch.int64)
    j = torch.arange(K)
    for l in range(2):
        for h in range(HKV):
            kept[l, 0, h] = j  # every row moves right by 2
            kept[l, 1, h] = torch.where(j < 50, j, j + 150)  # right moves, then left moves
            kept[l, 2, h] = j + 37 * (h + 1)  # left moves past a dest_start of 16
            kept[l, 3, h] = j + 60  # in place where dest_start = 60
    dest_start = torch.tensor([2, 100, 16, 60])
    check(caches, bt, kept.to(device), torch.tensor([K] * 4).to(device), dest_start.to(device))


def test_compact_paged_single_layer(paged_cache, device):
    """One cache tensor with [B, HKV, K] indices, num_kept per request, some empty."""
    torch.manual_seed(0)
    lens = [500, 40, 90]
    cache, bt = paged_cache(lens, 2, 64, 32, torch.float16, device)
    kept, _ = random_kept(lens, 1, 2, 64, device)
    num_kept = torch.tensor([64, 0, 17], dtype=torch.int32, device=device)
    check(cache, bt, kept[0], num_kept)


def test_compact_paged_per_layer_counts(paged_cache, device):
    torch.manual_seed(0)
    lens = [400, 130]
    caches, bt = paged_cache(lens, 2, 64, 16, torch.float32, device, num_layers=3)
    kept, num_kept = random_kept(lens, 3, 2, 100, device)
    num_kept[1, 0], num_kept[2, 1] = 33, 0
    check(caches, bt, kept, num_kept)


def test_compact_paged_rejects(paged_cache, device):
    torch.manual_seed(0)
    lens = [64, 40]
    caches, bt = paged_cache(lens, 2, 64, 16, torch.float16, device, num_layers=2)
    kept, num_kept = random_kept(lens, 2, 2, 16, device)
    with pytest.raises(NotImplementedError, match="fp8"):
        compact_paged([c.view(torch.uint8) for c in caches], bt, kept, num_kept)
    with pytest.raises(NotImplementedError, match="fp8"):
        compact_paged([c.to(torch.float8_e4m3fn) for c in caches], bt, kept, num_kept)
    with pytest.raises(ValueError, match="layer 1"):
        compact_paged([caches[0], caches[1].contiguous()], bt, kept, num_kept)
    with pytest.raises(ValueError, match="kept_indices"):
        compact_paged(caches, bt, kept[:, :, :1], num_kept)
    with pytest.raises(ValueError, match="num_kept"):
        compact_paged(caches, bt, kept, num_kept[:, :1])
    with pytest.raises(ValueError, match="block_tables"):
        compact_paged(caches, bt.long(), kept, num_kept)
    with pytest.raises(ValueError, match="dest_start"):
        compact_paged(caches, bt, kept, num_kept, torch.zeros(3, dtype=torch.int32, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["random", "shift", "engine"])
@pytest.mark.parametrize(
    "prompt_len,batch",
    [pytest.param(T, B, id=f"T{T // 1024}K-B{B}") for T in (8192, 32768, 131072) for B in (1, 16)],
)
def test_compact_paged_llama(paged_cache, device, prompt_len, batch, pattern):
    """Llama-3.1-8B caches (8 kv heads, head_dim 128, bf16) down to 1,024 kept tokens per head.

    pattern "random": sinks, window and random tokens; "shift": kept[j] = j + 1 + h, every
    destination is the previous row's source, across warps; "engine": random kept rows
    placed at [S, S + 1024) with S block aligned, as the engine lays them out. Up to 32 layers, as many as fit
    in ~8 GiB (the reference works on a second copy).
    """
    torch.manual_seed(0)
    lens = [prompt_len - (b * 997) % (prompt_len // 8) for b in range(batch)]
    layer_bytes = sum(lens) * 8 * 256 * 2
    num_layers = max(1, min(32, (8 << 30) // layer_bytes))
    caches, bt = paged_cache(lens, 8, 128, 16, torch.bfloat16, device, num_layers=num_layers)
    num_kept = torch.full((num_layers, batch), 1024, dtype=torch.int32, device=device)
    dest_start = None
    if pattern == "shift":
        kept = torch.arange(1024, device=device) + 1 + torch.arange(8, device=device)[:, None]
        kept = kept.expand(num_layers, batch, 8, 1024).contiguous()
    else:
        kept = _random_kept_gpu(lens, num_layers, 8, 1024, device)
    if pattern == "engine":
        dest_start = torch.tensor([(n - 1024) // 16 * 16 for n in lens], dtype=torch.int32, device=device)
    check(caches, bt, kept, num_kept, dest_start)


def _random_kept_gpu(num_tokens, num_layers, num_kv_heads, k_max, device):
    """`random_kept` on the device, for 128K-token requests."""
    kept = torch.empty(num_layers, len(num_tokens), num_kv_heads, k_max, dtype=torch.int32, device=device)
    for b, n in enumerate(num_tokens):
        score = torch.rand(num_layers, num_kv_heads, n, device=device)
        score[..., :4] = 2
        score[..., n - 32 :] = 2
        kept[:, b] = score.topk(k_max, dim=-1).indices.sort(dim=-1).values.int()
    return kept
