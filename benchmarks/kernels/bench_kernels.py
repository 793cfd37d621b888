"""Microbenchmarks of the eviction kernels on one CUDA GPU, Llama-3.1-8B shapes.

    python benchmarks/kernels/bench_kernels.py [--no-sweep] [--out benchmarks/results]

For prompts of 8K, 32K and 128K tokens at batch 1 and 16 (32 query heads, 8 kv heads,
head_dim 128, bf16, block_size 16, NHD cache, 32 soft tokens per request as in Judge Q):
- `score_paged` on one layer: time, bytes read and written, GB/s, % of peak HBM, the
  time of each of its kernels (torch.profiler), the host time of one call, the time of
  the call replayed from a CUDA graph, and the time with L2 emptied by a read instead of
  do_bench's write (see `_bench_clean_l2`);
- `compact_paged` down to 1,024 kept tokens per head, all layers in one launch (32 layers,
  fewer where 32 do not fit in memory);
- `torch.topk` of 1,024 over the [B, 8, T] scores, with the sort of the kept indices;
- a torch device-to-device copy, as a reachable-bandwidth sanity figure;
- (unless --no-sweep) `ScoreConfig` variants at 32K tokens, to re-tune the defaults.
Times are medians of `triton.testing.do_bench`, which clears L2 before every run. Writes
benchmarks/results/kernels-<device>-<date>.json and prints a table.
"""

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import triton
from triton.testing import do_bench

from judgeq_vllm.kernels import ScoreConfig, compact_paged, score_paged

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from provenance import git_commit  # noqa: E402

DEVICE = "cuda"
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_LAYERS = 32, 8, 128, 32
BLOCK_SIZE, N_SOFT, KEPT = 16, 32, 1024
PROMPTS, BATCHES, SWEEP_PROMPT = (8192, 32768, 131072), (1, 16), 32768
# (name fragment, peak HBM GB/s) from the vendors' data sheets, most specific first
PEAK_HBM_GBPS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350)]
# the defaults' neighbours, one parameter changed at a time, then the batch-1 grid (chunk x
# tile x pipeline depth x warps) where a program's fixed costs weigh most: every row is also
# timed from a CUDA graph, since eager batch-1 calls are bound by the launcher's host time
SWEEP = [
    ScoreConfig(),
    ScoreConfig(block_n=64),
    ScoreConfig(block_n=128),
    ScoreConfig(block_n=32),
    ScoreConfig(num_warps=8),
    ScoreConfig(num_stages=3),
    ScoreConfig(num_stages=4),
    ScoreConfig(block_m=64),
    ScoreConfig(chunk=512),
    ScoreConfig(chunk=1024),
    ScoreConfig(chunk=2048),
    ScoreConfig(chunk=4096),
]
SWEEP_B1 = [
    ScoreConfig(chunk=chunk, block_n=block_n, num_stages=stages, num_warps=warps)
    for chunk in (256, 512, 1024, 2048)
    for block_n in (64, 128)
    for stages in (2, 3, 4)
    for warps in (4, 8)
    if chunk >= 2 * block_n
]
ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-sweep", action="store_true", help="skip the ScoreConfig sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    peak = next((gbps for frag, gbps in PEAK_HBM_GBPS if frag in name), None)
    report = {
        "device": name,
        "peak_hbm_gbps": peak,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shapes": dict(
            num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
            block_size=BLOCK_SIZE, n_soft=N_SOFT, kept=KEPT, dtype="bfloat16", layout="NHD",
        ),
        "notes": (
            "score bytes: K of every key (stats pass) plus K of every candidate (score pass), "
            "queries once per pass, per-chunk row stats written and read, scores written; V "
            "is never read. These algorithmic bytes are what every pct_peak_hbm uses, the "
            "acceptance figure included (graph_pct_peak_hbm at 32K, batch 1). do_bench clears "
            "L2 before each call, but the score pass may find in L2 keys the stats pass just "
            "read (all of them when K fits, 8K tokens), so GB/s is then an effective figure, "
            "not HBM traffic: hbm_bytes_min counts K once (the least HBM traffic of a call) "
            "and graph_pct_peak_hbm_min is the graph time's percent of peak on those bytes. "
            "ms and pct_peak_hbm are eager calls timed by do_bench; graph_ms replays the "
            "same call from a CUDA graph (no host work); host_us is the CPU time "
            "of one eager call, which bounds back-to-back eager calls when it exceeds the GPU "
            "time (do_bench's L2 flush, a 256 MB write, gives the host a head start of about "
            "0.08 ms per call). That flush also leaves L2 full of dirty lines, which the call "
            "writes back as it evicts them; clean_l2_ms empties L2 by reading 256 MB instead, "
            "to show that share. "
            "compact bytes: moved rows read and written (rows already in place are skipped) "
            "plus the indices."
        ),
        "copy": bench_copy(),
        "score": [],
        "compact": [],
        "topk": [],
        "sweep": [],
    }
    for T in PROMPTS:
        for B in BATCHES:
            report["score"].append(bench_score(T, B, peak, ScoreConfig(), profile=True))
            report["topk"].append(bench_topk(T, B))
            report["compact"].append(bench_compact(T, B, peak))
    if not args.no_sweep:
        grid = [(B, cfg) for B in BATCHES for cfg in SWEEP] + [(1, cfg) for cfg in SWEEP_B1]
        for B, cfg in grid:
            row = bench_score(SWEEP_PROMPT, B, peak, cfg, profile=False)
            row["config"] = {k: v for k, v in vars(cfg).items()}
            report["sweep"].append(row)

    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    path = args.out / f"kernels-{slug}-{datetime.date.today():%Y%m%d}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print_tables(report)
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def bench_copy() -> dict:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    del src, dst
    return {"bytes": 2 << 30, "ms": ms, "gbps": (2 << 30) / ms / 1e6}


def paged_cache(lens: list[int], num_layers: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """bf16 NHD caches with a random permuted block table, as vLLM's FlashAttention lays them out."""
    blocks = [triton.cdiv(n, BLOCK_SIZE) for n in lens]
    num_blocks = sum(blocks) + 1
    perm = torch.randperm(num_blocks - 1, device=DEVICE).int() + 1
    block_tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32, device=DEVICE)
    start = 0
    for b, n in enumerate(blocks):
        block_tables[b, :n] = perm[start : start + n]
        start += n
    physical = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_DIM)
    caches = [
        torch.randn(physical, dtype=torch.bfloat16, device=DEVICE).permute(0, 2, 1, 3)
        for _ in range(num_layers)
    ]
    return caches, block_tables


def score_problem(T: int, B: int, cfg: ScoreConfig) -> Callable[[], torch.Tensor]:
    """One layer's `score_paged` call for B prompts of T tokens plus the soft tokens, with
    the host-side maxima given (no device sync), as the engine calls it."""
    key_len = T + N_SOFT
    (cache,), block_tables = paged_cache([key_len] * B, 1)
    queries = torch.randn(B * N_SOFT, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=DEVICE)
    qsl = torch.arange(0, B * N_SOFT + 1, N_SOFT, dtype=torch.int32, device=DEVICE)
    key_lens = torch.full((B,), key_len, dtype=torch.int32, device=DEVICE)
    num_cand = torch.full((B,), T, dtype=torch.int32, device=DEVICE)
    hints = dict(max_num_obs=N_SOFT, max_key_len=key_len, max_num_candidates=T)

    def run():
        return score_paged(
            queries, qsl, cache, block_tables, key_lens, num_cand, HEAD_DIM**-0.5, config=cfg, **hints
        )

    return run


def bench_score(T: int, B: int, peak: float | None, cfg: ScoreConfig, profile: bool) -> dict:
    key_len = T + N_SOFT
    run = score_problem(T, B, cfg)
    ms = do_bench(run, return_mode="median")
    # what the kernels read and write: K of every key in the stats pass and of every
    # candidate in the score pass (V is never touched), the queries once per pass, the
    # per-chunk row stats written then read, the scores written
    k_row = NUM_KV_HEADS * HEAD_DIM * 2
    resolved = cfg.resolved(B, NUM_KV_HEADS, key_len, torch.device(DEVICE))
    chunk = resolved.chunk
    rows = N_SOFT * (NUM_Q_HEADS // NUM_KV_HEADS)
    stats = B * NUM_KV_HEADS * triton.cdiv(key_len, chunk) * rows * 4 * 2
    query_bytes = B * N_SOFT * NUM_Q_HEADS * HEAD_DIM * 2
    small = 2 * query_bytes + 2 * stats + B * NUM_KV_HEADS * T * 4
    bytes_moved = B * (key_len + T) * k_row + small
    # the least a call can move through HBM: K once, when the second read hits L2
    hbm_bytes_min = B * key_len * k_row + small
    row = {
        "prompt_len": T, "batch": B, "key_len": key_len, "chunk": chunk, "block_n": resolved.block_n, "ms": ms,
        "bytes": bytes_moved, "gbps": bytes_moved / ms / 1e6,
        "pct_peak_hbm": 100 * bytes_moved / ms / 1e6 / peak if peak else None,
        "k_bytes_once": B * key_len * k_row, "hbm_bytes_min": hbm_bytes_min,
    }
    graph_ms = _bench_graph(run)
    row["graph_pct_peak_hbm_min"] = 100 * hbm_bytes_min / graph_ms / 1e6 / peak if peak else None
    timings = [("graph", graph_ms)]
    if profile:
        row["kernels_ms"] = _profile(run)
        row["host_us"] = _host_us(run)
        timings.append(("clean_l2", _bench_clean_l2(run)))
    for key, t in timings:
        row[f"{key}_ms"] = t
        row[f"{key}_pct_peak_hbm"] = 100 * bytes_moved / t / 1e6 / peak if peak else None
    del run  # the cache and queries it holds
    torch.cuda.empty_cache()
    return row


def bench_compact(T: int, B: int, peak: float | None) -> dict:
    # 8 kv heads x 2 x 128 x bf16 = 4 KiB per token and layer; keep the caches under ~24 GiB
    num_layers = max(1, min(NUM_LAYERS, (24 << 30) // (B * T * 4096)))
    caches, block_tables = paged_cache([T] * B, num_layers)
    score = torch.rand(num_layers, B, NUM_KV_HEADS, T, device=DEVICE)
    score[..., :4] = 2
    score[..., -N_SOFT:] = 2
    kept = score.topk(KEPT, dim=-1).indices.sort(dim=-1).values.int()
    num_kept = torch.full((B,), KEPT, dtype=torch.int32, device=DEVICE)
    moved = int((kept != torch.arange(KEPT, device=DEVICE)).sum())
    del score
    ms = do_bench(lambda: compact_paged(caches, block_tables, kept, num_kept), return_mode="median")
    # each moved row is read and written; rows already in place are skipped
    bytes_moved = moved * 2 * HEAD_DIM * 2 * 2 + kept.numel() * 4
    row = {
        "prompt_len": T, "batch": B, "layers": num_layers, "ms": ms, "ms_per_layer": ms / num_layers,
        "moved_rows": moved, "bytes": bytes_moved, "gbps": bytes_moved / ms / 1e6,
        "pct_peak_hbm": 100 * bytes_moved / ms / 1e6 / peak if peak else None,
    }
    del caches, kept
    torch.cuda.empty_cache()
    return row


def bench_topk(T: int, B: int) -> dict:
    scores = torch.rand(B, NUM_KV_HEADS, T, device=DEVICE)
    ms_topk = do_bench(lambda: scores.topk(KEPT, dim=-1, sorted=False), return_mode="median")
    ms_both = do_bench(
        lambda: scores.topk(KEPT, dim=-1, sorted=False).indices.sort(dim=-1), return_mode="median"
    )
    return {"prompt_len": T, "batch": B, "k": KEPT, "topk_ms": ms_topk, "topk_sort_ms": ms_both}


def _host_us(fn, iters: int = 100) -> float:
    """CPU time of one call, launches queued without waiting for the GPU."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - start) / iters * 1e6
    torch.cuda.synchronize()
    return host


def _bench_graph(fn) -> float:
    """do_bench of the call replayed from a CUDA graph: the GPU time without host work."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    # compile and warm up outside the capture
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, return_mode="median")


def _bench_clean_l2(fn, iters: int = 100) -> float:
    """Median time of a call after L2 is emptied by reading 256 MB, which leaves it clean."""
    flush = torch.zeros(256 << 20, dtype=torch.int8, device=DEVICE)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    fn()
    for start, end in zip(starts, ends):
        flush.max()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _profile(fn, iters: int = 10) -> dict:
    """Device time of each kernel per call, with L2 cleared between calls as do_bench does."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device=DEVICE)
    fn()
    torch.cuda.synchronize()
    # the breakdown is a bonus: a profiler failure must not lose the rest of the run
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                flush.zero_()
                fn()
            torch.cuda.synchronize()
        return {
            evt.key: evt.device_time_total / 1e3 / iters
            for evt in prof.key_averages()
            if evt.key.endswith("_kernel")
        }
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)}


def print_tables(report: dict) -> None:
    print(f"{report['device']}  peak HBM {report['peak_hbm_gbps']} GB/s  "
          f"torch copy {report['copy']['gbps']:.0f} GB/s")
    print("\nscore_paged, one layer (32 soft tokens, Llama-3.1-8B heads)")
    print("(%peak on algorithmic bytes, K read twice; 'graph' is the acceptance figure, "
          "'g-hbm' the graph time on K read once)")
    print(f"{'prompt':>8} {'B':>3} {'ms':>8} {'MB':>9} {'GB/s':>7} {'%peak':>6} "
          f"{'graph':>6} {'g-hbm':>6} {'gr ms':>7} {'clean':>6} {'host us':>7}  kernels (ms)")
    for r in report["score"]:
        kernels = " ".join(
            f"{k.removeprefix('score_').removesuffix('_kernel')}={v:.3f}"
            if isinstance(v, float) else f"{k}={v}"
            for k, v in r["kernels_ms"].items()
        )
        print(f"{r['prompt_len']:>8} {r['batch']:>3} {r['ms']:>8.3f} {r['bytes'] / 1e6:>9.1f} "
              f"{r['gbps']:>7.0f} {_pct(r['pct_peak_hbm']):>6} {_pct(r['graph_pct_peak_hbm']):>6} "
              f"{_pct(r['graph_pct_peak_hbm_min']):>6} {r['graph_ms']:>7.4f} "
              f"{_pct(r['clean_l2_pct_peak_hbm']):>6} {r['host_us']:>7.1f}  {kernels}")
    print(f"\ncompact_paged to {KEPT} kept tokens per head, all layers in one launch")
    print(f"{'prompt':>8} {'B':>3} {'layers':>6} {'ms':>8} {'ms/layer':>9} {'GB/s':>7} {'%peak':>6}")
    for r in report["compact"]:
        print(f"{r['prompt_len']:>8} {r['batch']:>3} {r['layers']:>6} {r['ms']:>8.3f} "
              f"{r['ms_per_layer']:>9.4f} {r['gbps']:>7.0f} {_pct(r['pct_peak_hbm']):>6}")
    print(f"\ntorch.topk(k={KEPT}) over [B, {NUM_KV_HEADS}, T] fp32 scores")
    print(f"{'prompt':>8} {'B':>3} {'topk ms':>9} {'+sort ms':>9}")
    for r in report["topk"]:
        print(f"{r['prompt_len']:>8} {r['batch']:>3} {r['topk_ms']:>9.3f} {r['topk_sort_ms']:>9.3f}")
    score = next(r for r in report["score"] if r["prompt_len"] == 32768 and r["batch"] == 1)
    compact = next(r for r in report["compact"] if r["prompt_len"] == 32768 and r["batch"] == 1)
    print(f"\nacceptance: score 32K B=1 under a CUDA graph at "
          f"{_pct(score['graph_pct_peak_hbm'])}% of peak HBM on algorithmic bytes (>= 60), "
          f"{_pct(score['graph_pct_peak_hbm_min'])}% on K read once; eager "
          f"{_pct(score['pct_peak_hbm'])}%")
    print(f"acceptance: compact 32K -> {KEPT} x {compact['layers']} layers in "
          f"{compact['ms']:.3f} ms (< 0.5)")
    if report["sweep"]:
        print("\nScoreConfig sweep at 32K tokens")
        for r in report["sweep"]:
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k != "chunk")
            print(f"  B={r['batch']:<3} {r['ms']:>8.3f} ms {_pct(r['pct_peak_hbm']):>6}%  graph "
                  f"{r['graph_ms']:>7.4f} ms {_pct(r['graph_pct_peak_hbm']):>6}% "
                  f"(K once {_pct(r['graph_pct_peak_hbm_min']):>5}%)  chunk={r['chunk']}, {cfg}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"



if __name__ == "__main__":
    main()
