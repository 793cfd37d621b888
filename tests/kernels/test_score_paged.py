"""`score_paged` against `naive_score_paged` on random paged caches."""

import pytest
import torch

from judgeq_vllm.kernels import ScoreConfig, naive_score_paged, score_paged

# scores are sums of softmax probabilities (O(n_obs * G) in total); 1e-3 relative in fp32
RTOL, ATOL = 1e-3, 1e-6


def make_inputs(
    paged_cache, device, lens, n_obs, G, HKV, D, BS, dtype, layout="NHD", cand="judgeq", q_scale=1.0
):
    """Requests with key_lens `lens` whose last `n_obs` positions are the observation queries.

    cand: "judgeq" scores the keys before the observation tokens (num_candidates =
    key_len - n_obs, as Judge Q with soft tokens and SnapKV with its window both do),
    "all" every key (the causal diagonal is scored too), "half" the first half.
    """
    kv_cache, block_tables = paged_cache(lens, HKV, D, BS, dtype, device, layout)
    key_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    obs = torch.tensor(n_obs, dtype=torch.int32, device=device)
    qsl = torch.zeros(len(lens) + 1, dtype=torch.int32, device=device)
    qsl[1:] = obs.cumsum(0)
    num_candidates = {"judgeq": key_lens - obs, "all": key_lens, "half": key_lens // 2}[cand]
    queries = (q_scale * torch.randn(sum(n_obs), HKV * G, D, device=device)).to(dtype)
    return queries, qsl, kv_cache, block_tables, key_lens, num_candidates.int()


def check(args, scale, pool=1, config=None, hints=None):
    out = score_paged(*args, scale, pool, config=config, **(hints or {}))
    ref = naive_score_paged(*args, scale, pool)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def dtypes(device):
    # the interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584):
    # bf16 is checked on the GPU only
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize(
    "G,D,BS",
    [
        pytest.param(G, D, BS, id=f"G{G}-D{D}-BS{BS}")
        for G in (1, 4, 8)
        for D in (64, 128)
        for BS in (16, 32)
    ],
)
def test_score_paged(paged_cache, device, G, D, BS):
    torch.manual_seed(0)
    # ragged requests, partly filled last blocks, one observation query for the third
    args = make_inputs(paged_cache, device, [150, 63, 97], [7, 3, 1], G, 2, D, BS, torch.float32)
    check(args, D**-0.5)


@pytest.mark.parametrize(
    "lens,n_obs,cand,layout,pool,config",
    [
        pytest.param([1000], [8], "judgeq", "NHD", 1, None, id="T1000"),
        pytest.param([1000, 63], [8, 5], "judgeq", "NHD", 1, ScoreConfig(chunk=128), id="T1000-chunk128"),
        pytest.param([300, 45, 129], [9, 4, 2], "all", "NHD", 1, ScoreConfig(chunk=64), id="all-cand"),
        pytest.param([300, 45, 129], [9, 4, 2], "half", "HND", 1, ScoreConfig(chunk=64), id="half-cand-HND"),
        pytest.param([200, 77], [32, 16], "judgeq", "padded", 1, ScoreConfig(chunk=64, block_m=16), id="m-tiles-padded"),
        pytest.param([200, 77], [32, 16], "all", "NHD", 1, ScoreConfig(chunk=64, block_m=32), id="m-tiles-all"),
        pytest.param([250, 40, 129], [6, 3, 1], "judgeq", "NHD", 7, ScoreConfig(chunk=64), id="pool7"),
        pytest.param([1000, 300], [8, 5], "judgeq", "NHD", 7, ScoreConfig(chunk=256, block_n=128), id="block-n128"),
        pytest.param([250, 40, 129], [6, 3, 1], "all", "HND", 3, None, id="pool3-all"),
        pytest.param([64, 32], [32, 32], "judgeq", "NHD", 5, None, id="obs-only-tail"),
    ],
)
def test_score_paged_shapes(paged_cache, device, lens, n_obs, cand, layout, pool, config):
    torch.manual_seed(0)
    args = make_inputs(paged_cache, device, lens, n_obs, 4, 2, 64, 16, torch.float32, layout, cand)
    check(args, 64**-0.5, pool, config)


def test_score_paged_dtypes(paged_cache, device):
    torch.manual_seed(0)
    for dtype in dtypes(device):
        args = make_inputs(paged_cache, device, [130, 41], [5, 2], 4, 2, 64, 16, dtype)
        check(args, 64**-0.5, config=ScoreConfig(chunk=64))


def test_score_paged_peaked_softmax(paged_cache, device):
    """Logits in the hundreds: the online max and the chunk merge must keep exp2 in range."""
    torch.manual_seed(0)
    args = make_inputs(paged_cache, device, [700, 90], [6, 3], 4, 2, 64, 16, torch.float32, q_scale=40.0)
    check(args, 64**-0.5, config=ScoreConfig(chunk=64))


def test_block_n_default_follows_the_problem_size():
    cpu = torch.device("cpu")
    assert ScoreConfig().resolved(1, 8, 8224, cpu).block_n == 64
    assert ScoreConfig().resolved(1, 8, 32800, cpu).block_n == 128
    assert ScoreConfig().resolved(16, 8, 8224, cpu).block_n == 128
    # an explicit chunk that 128-key tiles do not divide keeps 64
    assert ScoreConfig(chunk=64).resolved(16, 8, 8224, cpu).block_n == 64


def test_score_paged_hints(paged_cache, device):
    """Host-side maxima skip the sync; a larger max_num_obs only pads row tiles."""
    torch.manual_seed(0)
    args = make_inputs(paged_cache, device, [100, 60], [5, 2], 4, 2, 64, 16, torch.float32)
    hints = dict(max_num_obs=9, max_key_len=100, max_num_candidates=95)
    check(args, 64**-0.5, hints=hints)


def test_score_paged_rejects(paged_cache, device):
    torch.manual_seed(0)
    queries, qsl, kv_cache, bt, key_lens, ncand = make_inputs(
        paged_cache, device, [40, 20], [4, 2], 4, 2, 64, 16, torch.float32
    )
    with pytest.raises(ValueError, match="pool_kernel"):
        score_paged(queries, qsl, kv_cache, bt, key_lens, ncand, 0.1, pool_kernel=4)
    with pytest.raises(ValueError, match="n_obs <= key_len"):
        score_paged(queries, qsl, kv_cache, bt, key_lens, key_lens + 1, 0.1)
    with pytest.raises(ValueError, match="HQ a multiple"):
        score_paged(queries[:, :3], qsl, kv_cache, bt, key_lens, ncand, 0.1)
    with pytest.raises(ValueError, match="int32"):
        score_paged(queries, qsl, kv_cache, bt.long(), key_lens, ncand, 0.1)
    with pytest.raises(NotImplementedError, match="fp8"):
        score_paged(queries, qsl, kv_cache.to(torch.uint8), bt, key_lens, ncand, 0.1)
    with pytest.raises(NotImplementedError, match="fp8"):
        score_paged(queries, qsl, kv_cache.to(torch.float8_e4m3fn), bt, key_lens, ncand, 0.1)


LLAMA_SHAPES = [
    pytest.param(T, B, id=f"T{T // 1024}K-B{B}") for T in (8192, 32768, 131072) for B in (1, 16)
]


@pytest.mark.gpu
@pytest.mark.parametrize("prompt_len,batch", LLAMA_SHAPES)
def test_score_paged_llama(paged_cache, device, prompt_len, batch):
    """Llama-3.1-8B heads (32 q / 8 kv, head_dim 128), bf16, 32 soft tokens per request.

    Judge Q layout: key_len = prompt + 32 soft tokens, the prompt keys are the candidates.
    The reference runs on the first and last request only (it holds [32, 32, T] logits).
    """
    torch.manual_seed(0)
    n_soft = 32
    lens = [prompt_len + n_soft - (b * 997) % (prompt_len // 8) for b in range(batch)]
    args = make_inputs(paged_cache, device, lens, [n_soft] * batch, 4, 8, 128, 16, torch.bfloat16)
    out = score_paged(*args, 128**-0.5)
    assert not out.isnan().any()
    for b in sorted({0, batch - 1}):
        ref = naive_score_paged(*_request(args, b), 128**-0.5)
        torch.testing.assert_close(out[b : b + 1, :, : ref.shape[-1]], ref, rtol=RTOL, atol=ATOL)
        assert torch.isneginf(out[b, :, ref.shape[-1] :]).all()


@pytest.mark.gpu
def test_score_paged_llama_pool(paged_cache, device):
    torch.manual_seed(0)
    args = make_inputs(paged_cache, device, [32768 + 32, 20000], [32, 32], 4, 8, 128, 16, torch.bfloat16)
    check(args, 128**-0.5, pool=7)


def _request(args, b):
    """The inputs of request b alone."""
    queries, qsl, kv_cache, block_tables, key_lens, ncand = args
    sub_qsl = qsl[b : b + 2] - qsl[b]
    return (
        queries[qsl[b] : qsl[b + 1]], sub_qsl, kv_cache, block_tables[b : b + 1],
        key_lens[b : b + 1], ncand[b : b + 1],
    )
