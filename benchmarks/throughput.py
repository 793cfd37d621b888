"""Throughput under a KV-memory budget: vanilla vLLM and each eviction policy, in one run.

    python -m benchmarks.throughput --config smoke|smollm2|llama8b-shape [--modes offline,online] ...

Every request has the same prompt length and output length (random token ids, greedy,
``ignore_eos``), so a run differs from vanilla only in how much KV each request keeps
after its prefill. The KV pool is fixed per cell (``kv_cache_memory_bytes`` = pool
tokens x KV bytes per token), so freed blocks turn into more requests running together.

- offline (``LLMEngine``, all requests submitted at once): vanilla at every pool size;
  each policy at every budget on the reference pool, and at the reference budget on
  every pool;
- online (``vllm serve`` on loopback + async client, each request rate): vanilla, and each
  policy at every budget, on the reference pool.

Vanilla is vLLM without the plugin. A policy's engine starts once per pool and takes
each budget per request (``extra_args``/``vllm_xargs`` ``kv_budget``), one batch or load
at a time.

Speed is reported as a ratio against vanilla measured in the same run, at the same pool
(offline) or the same request rate (online); memory saved as the blocks the engine
actually returned to its pool (its eviction counters). Writes
``benchmarks/results/throughput/<config>-<device>-<date>.json`` and PNG plots next to it.

On a GPU, offline engines keep vLLM's default of an EngineCore process each: started one
after another in one process, a later engine's CUDA-graph capture can reopen vLLM's global
graph pool that the earlier engine's teardown left at use count 0 (PyTorch's
``use_count > 0`` internal assert, vllm-project/vllm#28426; seen on an H100 at the second
of three engines), so ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is refused there.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from judgeq_vllm.policies import KVBudget

from .common import (
    add_engine_arguments,
    BLOCK_SIZE,
    MODELS,
    N_SOFT,
    RESULTS_ROOT,
    VANILLA,
    Setting,
    budget_value,
    check_policies,
    default_enforce_eager,
    kv_bytes_per_token,
    parse_budgets,
    parse_engine_args,
    pyplot,
    result_header,
    result_stem,
    soft_tokens_for,
    split_list,
    write_json,
)

MODULE = "benchmarks.throughput"
# pyramidkv's decode after compaction runs PIECEWISE graphs (per-layer lengths and slots,
# docs/gpu-path-design.md §4.7), not FULL ones: left out of the throughput comparison
# (--policies adds it)
GPU_POLICIES = ("judgeq", "snapkv", "streamingllm", "h2o", "knorm")


@dataclasses.dataclass(frozen=True)
class ThroughputConfig:
    """One named benchmark configuration (each field has a CLI override).

    Attributes:
        model: key of ``common.MODELS``.
        dtype: model and KV-cache dtype.
        num_requests: offline batch size (every request submitted at once).
        online_requests: requests sent per online load.
        prompt_len / output_len: tokens per request.
        policies: eviction policies compared with vanilla.
        budgets: ``--kv-budget`` values (tokens or ratios); the middle one is the reference.
        pools: KV pool sizes in tokens; the middle one is the reference.
        request_rates: online arrival rates in requests/s (``inf``: all at once).
        max_num_seqs: the engine's cap on running requests (set high: the pool is the limit).
        max_num_batched_tokens: tokens per engine step.
    """

    model: str
    dtype: str
    num_requests: int
    online_requests: int
    prompt_len: int
    output_len: int
    policies: tuple[str, ...]
    budgets: tuple[str, ...]
    pools: tuple[int, ...]
    request_rates: tuple[float, ...]
    max_num_seqs: int
    max_num_batched_tokens: int


CONFIGS: dict[str, ThroughputConfig] = {
    # CPU, a few seconds of work per engine: checks the pipeline and the output files
    "smoke": ThroughputConfig(
        model="smollm2", dtype="float32", num_requests=6, online_requests=6, prompt_len=320, output_len=12,
        policies=("snapkv",), budgets=("64",), pools=(1536,), request_rates=(8.0, math.inf),
        max_num_seqs=8, max_num_batched_tokens=512,
    ),
    # GPU host: the real weights; 4K-token prompts, the reference pool (32K tokens) holds 7 in full
    "smollm2": ThroughputConfig(
        model="smollm2", dtype="bfloat16", num_requests=512, online_requests=256, prompt_len=4000, output_len=256,
        policies=GPU_POLICIES, budgets=("128", "256", "512", "1024", "0.75"), pools=(16384, 32768, 65536),
        request_rates=(16.0, math.inf), max_num_seqs=512, max_num_batched_tokens=8192,
    ),
    # GPU host: 8B serving shape (ASSETS.md's vanilla baselines: 8 GiB = 65,536 tokens);
    # judgeq with random soft tokens (dummy weights: only its cost matters)
    "llama8b-shape": ThroughputConfig(
        model="llama8b-shape", dtype="bfloat16", num_requests=128, online_requests=128, prompt_len=8000, output_len=256,
        policies=GPU_POLICIES, budgets=("256", "512", "1024", "2048"),
        pools=(32768, 65536, 131072), request_rates=(4.0, math.inf), max_num_seqs=256, max_num_batched_tokens=8192,
    ),
}


@dataclasses.dataclass(frozen=True)
class EngineRun:
    """One engine of the offline grid, on a KV pool of ``pool_tokens``, and the batches it
    runs: the same prompts once per setting (a policy's budgets are per request)."""

    engine: Setting
    pool_tokens: int
    batches: tuple[Setting, ...]


def reference(values: list) -> Any:
    """The middle value: the point each sweep holds fixed while the other varies."""
    return values[len(values) // 2]


def offline_runs(policies: list[str], budgets: list, pools: list[int]) -> list[EngineRun]:
    """Vanilla at every pool; each policy at every budget on the reference pool, and at
    the reference budget on the other pools. Vanilla runs first, so every ratio has its
    baseline before the policies are measured."""
    ref_pool, ref_budget = reference(pools), reference(budgets)
    runs = [EngineRun(Setting(), pool, (Setting(),)) for pool in pools]
    for policy in policies:
        for pool in pools:
            budgets_here = budgets if pool == ref_pool else [ref_budget]
            runs.append(EngineRun(Setting(policy, ref_budget), pool, tuple(Setting(policy, b) for b in budgets_here)))
    return runs


def random_prompts(tokenizer, num_requests: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Token ids drawn uniformly from the ordinary (non-special) vocabulary."""
    import numpy as np

    special = set(tokenizer.all_special_ids)
    ordinary = np.array([i for i in range(tokenizer.vocab_size) if i not in special])
    rng = np.random.default_rng(seed)
    return [rng.choice(ordinary, prompt_len).tolist() for _ in range(num_requests)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--modes", default="offline,online", help="offline, online or both (comma-separated)")
    parser.add_argument("--policies", help="comma-separated policies (default: the config's)")
    parser.add_argument("--budgets", help="comma-separated budgets, tokens or ratios (default: the config's)")
    parser.add_argument("--pools", help="comma-separated KV pool sizes in tokens (default: the config's)")
    parser.add_argument("--request-rates", help="comma-separated online request rates per second, inf = all at once")
    parser.add_argument("--num-requests", type=int, help="offline requests")
    parser.add_argument("--online-requests", type=int, help="requests per online load")
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--output-len", type=int)
    add_engine_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="prompts and arrival times")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT / "throughput")
    return parser.parse_args(argv)


def resolved_config(args: argparse.Namespace) -> ThroughputConfig:
    config = CONFIGS[args.config]
    overrides = {
        "policies": tuple(check_policies(split_list(args.policies))) if args.policies is not None else None,
        "budgets": tuple(split_list(args.budgets)) if args.budgets else None,
        "pools": tuple(int(item) for item in split_list(args.pools)) if args.pools else None,
        "request_rates": tuple(float(item) for item in split_list(args.request_rates)) if args.request_rates else None,
        "num_requests": args.num_requests,
        "online_requests": args.online_requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
    }
    return dataclasses.replace(config, **{key: value for key, value in overrides.items() if value is not None})


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything the grids share, resolved from the command line."""

    config: ThroughputConfig
    model_dir: Path
    soft_tokens: Path | None
    budgets: list[KVBudget]
    pools: list[int]
    enforce_eager: bool
    extra_engine_args: dict[str, Any]
    seed: int

    def engine_kwargs(self, pool_tokens: int) -> dict[str, Any]:
        """The engine arguments every setting shares on one pool (eviction excluded)."""
        config = self.config
        # kv_cache_memory_bytes is per worker, and each of N tensor-parallel workers holds
        # 1/N of the KV heads: the same pool in tokens at any N
        ranks = int(self.extra_engine_args.get("tensor_parallel_size", 1))
        pool_bytes = pool_tokens * kv_bytes_per_token(self.model_dir, config.dtype) // ranks
        kwargs = dict(
            model=str(self.model_dir), dtype=config.dtype, load_format=MODELS[config.model].load_format, seed=0,
            block_size=BLOCK_SIZE, kv_cache_memory_bytes=pool_bytes,
            # room for Judge Q's soft tokens, which count towards vLLM's length
            max_model_len=config.prompt_len + config.output_len + N_SOFT + BLOCK_SIZE,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            # prompts share no prefix; vanilla and policies alike run without the cache
            enable_prefix_caching=False,
        )
        if self.enforce_eager:
            kwargs["enforce_eager"] = True
        return kwargs | self.extra_engine_args

    def prompts(self, tokenizer, num_requests: int, seed: int) -> list[list[int]]:
        return random_prompts(tokenizer, num_requests, self.config.prompt_len, seed)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    modes = split_list(args.modes)
    if not modes or not set(modes) <= {"offline", "online"}:
        raise SystemExit(f"--modes takes offline and/or online, got {args.modes!r}")
    config = resolved_config(args)
    if "offline" in modes:
        refuse_in_process_cuda_engines()
    spec = MODELS[config.model]
    model_dir = args.model_dir or spec.default_path()
    header = result_header("throughput", args.config, args.tag, MODULE, argv)
    stem = result_stem(header)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory(prefix="judgeq-bench-") as scratch:
        soft_tokens, soft_tokens_description = soft_tokens_for(spec, model_dir, args.soft_tokens, Path(scratch))
        run = Run(
            config=config, model_dir=Path(model_dir), soft_tokens=soft_tokens,
            budgets=parse_budgets(",".join(config.budgets)), pools=sorted(config.pools),
            enforce_eager=default_enforce_eager() if args.enforce_eager is None else args.enforce_eager,
            extra_engine_args=parse_engine_args(args.engine_arg), seed=args.seed,
        )
        report = {**header, **describe(run, spec), "soft_tokens": soft_tokens_description}
        report.update(offline=[], online=[], online_servers=[])
        # a run that is cut short (a host's time limit) still leaves every finished engine's rows
        partial = args.out / f"{stem}.partial.json"
        checkpoint = functools.partial(write_json, partial, report)
        if "offline" in modes:
            run_offline_grid(run, run.prompts(tokenizer, config.num_requests, args.seed), report["offline"], checkpoint)
        if "online" in modes:
            prompts = run.prompts(tokenizer, config.online_requests, args.seed + 1)
            run_online_grid(run, prompts, server_logs_dir(stem), report["online"], report["online_servers"], checkpoint)
    report["plots"] = write_plots(report, args.out, stem)
    path = write_json(args.out / f"{stem}.json", report)
    partial.unlink(missing_ok=True)
    print(format_tables(report))
    print(f"wrote {path}")
    return path


def refuse_in_process_cuda_engines() -> None:
    """Offline engines on a GPU each need their own EngineCore process (module docstring)."""
    import torch

    if torch.cuda.is_available() and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        raise SystemExit(
            "benchmarks.throughput: unset VLLM_ENABLE_V1_MULTIPROCESSING=0 on a GPU: offline engines started one "
            "after another in one process can fail CUDA-graph capture on vLLM's shared graph pool "
            "(PyTorch 'use_count > 0' internal assert, vllm-project/vllm#28426)"
        )


def server_logs_dir(stem: str) -> Path:
    """A folder of its own for this run's server logs, in the per-machine cache (out of
    the committed results; concurrent runs never share a log file)."""
    from judgeq_vllm.assets.store import judgeq_home

    parent = judgeq_home() / "benchmarks" / "logs"
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=parent))


def describe(run: Run, spec) -> dict[str, Any]:
    """The run's fixed parameters, as the result file records them."""
    config = run.config
    return {
        "model": {"key": config.model, "description": spec.description, "path": str(run.model_dir), "dtype": config.dtype},
        "workload": {
            "num_requests": config.num_requests, "online_requests": config.online_requests,
            "prompt_len": config.prompt_len, "output_len": config.output_len, "seed": run.seed,
            "prompts": "random ordinary token ids; greedy; ignore_eos",
        },
        "engine": run.engine_kwargs(reference(run.pools)) | {"kv_cache_memory_bytes": "pool_tokens x kv_bytes_per_token"},
        "kv_bytes_per_token": kv_bytes_per_token(run.model_dir, config.dtype),
        "reference": {"pool_tokens": reference(run.pools), "budget": budget_value(reference(run.budgets))},
        "request_rates": [rate_value(rate) for rate in config.request_rates],
        "notes": NOTES,
    }


NOTES = (
    "speed_ratio: output tok/s over vanilla's at the same pool (offline) or request rate (online), same run. "
    "eviction: the engine's own counters (judgeq_stats) for the measured batch; blocks_freed are KV blocks "
    "returned to the pool after prefill, freed_gib their size. Offline peaks come from every engine step's "
    "scheduler stats. Online peaks come from /metrics sampled every 0.2 s; online eviction per load comes from "
    "the judgeq:* Prometheus counters the server exports (refreshed once a second); online_servers holds each "
    "server's totals since start-up (one warm-up request included)."
)


def run_offline_grid(run: Run, prompts: list[list[int]], rows: list[dict], checkpoint: Callable[[], Any]) -> None:
    """Appends one row per (engine, setting) to ``rows``, calling ``checkpoint`` after each engine."""
    from .offline import run_offline

    bytes_per_token = kv_bytes_per_token(run.model_dir, run.config.dtype)
    for engine_run in offline_runs(list(run.config.policies), run.budgets, run.pools):
        kwargs = run.engine_kwargs(engine_run.pool_tokens) | engine_run.engine.eviction_kwargs(run.soft_tokens)
        results = run_offline(kwargs, list(engine_run.batches), prompts, run.config.output_len)
        for setting, result in zip(engine_run.batches, results, strict=True):
            result["eviction"]["freed_gib"] = freed_gib(result["eviction"]["blocks_freed"], bytes_per_token)
            rows.append({**setting.as_dict(), "pool_tokens": engine_run.pool_tokens, **result})
        # vanilla runs first at every pool, so each policy row has its baseline here
        add_speed_ratios(rows, "pool_tokens")
        checkpoint()


def freed_gib(blocks: int, bytes_per_token: int) -> float:
    return round(blocks * BLOCK_SIZE * bytes_per_token / 2**30, 4)


def add_speed_ratios(rows: list[dict], matched_on: str) -> None:
    """Output tok/s over vanilla's, vanilla taken from the row with the same ``matched_on``."""
    vanilla = {row[matched_on]: row["output_tok_s"] for row in rows if row["policy"] == VANILLA}
    for row in rows:
        row["speed_ratio"] = round(row["output_tok_s"] / vanilla[row[matched_on]], 4)


def run_online_grid(
    run: Run, prompts: list[list[int]], logs: Path, rows: list[dict], servers: list[dict], checkpoint: Callable[[], Any]
) -> None:
    """One server for vanilla and one per policy, on the reference pool; each policy's
    server takes every budget (per request) at every request rate. Appends to ``rows``
    and ``servers``, calling ``checkpoint`` after each server."""
    from .serving import engine_flags, eviction_totals, local_server, run_load

    pool = reference(run.pools)
    flags = engine_flags(run.engine_kwargs(pool))
    for engine in [Setting()] + [Setting(policy, reference(run.budgets)) for policy in run.config.policies]:
        settings = [engine] if engine.policy is None else [Setting(engine.policy, budget) for budget in run.budgets]
        log_path = logs / f"{engine.policy or VANILLA}.log"
        server = local_server(flags + engine.server_flags(run.soft_tokens), log_path)
        started = time.monotonic()
        with server:
            startup_s = time.monotonic() - started
            run_load(server.url, [prompts[0][:16]], 2, math.inf, run.seed, engine.request_args(), "warm-up")
            for setting in settings:
                rows += [online_row(run, server.url, setting, rate, prompts) for rate in run.config.request_rates]
            totals = eviction_totals(server.url)
        servers.append({
            "policy": engine.policy or VANILLA, "startup_s": round(startup_s, 1), "exit_code": server.process.returncode,
            "eviction_totals": totals, "log": str(log_path),
        })
        add_speed_ratios(rows, "request_rate")
        checkpoint()


def online_row(run: Run, url: str, setting: Setting, rate: float, prompts: list[list[int]]) -> dict[str, Any]:
    from .serving import run_load

    label = f"{setting.label} {rate_label(rate)}"
    result = run_load(url, prompts, run.config.output_len, rate, run.seed, setting.request_args(), label)
    return {**setting.as_dict(), "pool_tokens": reference(run.pools), "request_rate": rate_value(rate), **result}


def rate_value(rate: float) -> float | str:
    """JSON has no infinity: ``"inf"`` stands for all requests at once."""
    return rate if math.isfinite(rate) else "inf"


def rate_label(rate: float | str) -> str:
    return "all at once" if rate in ("inf", math.inf) else f"{rate:g} req/s"


# --- plots and tables ----------------------------------------------------------------


def write_plots(report: dict, out_dir: Path, stem: str) -> list[str]:
    plt = pyplot()
    written = []
    offline = report["offline"]
    if offline:
        written += [
            _plot_offline_vs_budget(plt, report, "output_tok_s", "output tokens/s", out_dir / f"{stem}-tok-s-vs-budget.png"),
            _plot_offline_vs_pool(plt, report, out_dir / f"{stem}-tok-s-vs-pool.png"),
            _plot_offline_vs_budget(plt, report, "peak_running_requests", "max concurrent requests reached",
                                    out_dir / f"{stem}-max-concurrency.png"),
        ]
    if report["online"]:
        written.append(_plot_online(plt, report, out_dir / f"{stem}-online.png"))
    return [path.name for path in written]


def _title(report: dict, what: str) -> str:
    return f"{what}\n{report['model']['key']} {report['model']['dtype']}, {report['device']}"


def _plot_offline_vs_budget(plt, report: dict, field: str, ylabel: str, path: Path) -> Path:
    """One line per policy across budgets (categorical axis: tokens and ratios mix), vanilla dashed."""
    ref_pool = report["reference"]["pool_tokens"]
    rows = [row for row in report["offline"] if row["pool_tokens"] == ref_pool]
    budgets = list(dict.fromkeys(row["budget"] for row in rows if row["policy"] != VANILLA))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in dict.fromkeys(row["policy"] for row in rows if row["policy"] != VANILLA):
        by_budget = {row["budget"]: row[field] for row in rows if row["policy"] == policy}
        ax.plot(range(len(budgets)), [by_budget.get(budget, math.nan) for budget in budgets], marker="o", label=policy)
    vanilla = [row[field] for row in rows if row["policy"] == VANILLA]
    if vanilla:
        ax.axhline(vanilla[0], color="black", linestyle="--", label=VANILLA)
    ax.set_xticks(range(len(budgets)), [str(budget) for budget in budgets])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("KV budget (tokens per head, or compression ratio)")
    ax.set_ylabel(ylabel)
    ax.set_title(_title(report, f"{ylabel}, KV pool {ref_pool} tokens"), fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _plot_offline_vs_pool(plt, report: dict, path: Path) -> Path:
    ref_budget = report["reference"]["budget"]
    rows = report["offline"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in dict.fromkeys(row["policy"] for row in rows):
        points = sorted(
            (row["pool_tokens"], row["output_tok_s"]) for row in rows
            if row["policy"] == policy and (policy == VANILLA or row["budget"] == ref_budget)
        )
        ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=policy,
                **({"color": "black", "linestyle": "--"} if policy == VANILLA else {}))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV pool (tokens)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(_title(report, f"output tokens/s vs KV pool, budget {ref_budget}"), fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _plot_online(plt, report: dict, path: Path) -> Path:
    rows = report["online"]
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    rates = list(dict.fromkeys(row["request_rate"] for row in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / len(rates)
    for index, rate in enumerate(rates):
        by_setting = {row["setting"]: row for row in rows if row["request_rate"] == rate}
        positions = [i + index * width for i in range(len(settings))]
        axes[0].bar(positions, [by_setting[s]["output_tok_s"] for s in settings], width, label=rate_label(rate))
        axes[1].bar(positions, [by_setting[s]["ttft_ms"]["p50"] or 0 for s in settings], width, label=rate_label(rate))
    for ax, ylabel in zip(axes, ("output tokens/s", "TTFT p50 (ms)")):
        ax.set_xticks([i + width * (len(rates) - 1) / 2 for i in range(len(settings))], settings, rotation=30, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(_title(report, f"online, KV pool {report['reference']['pool_tokens']} tokens"), fontsize=9)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_tables(report: dict) -> str:
    lines = []
    if report["offline"]:
        lines.append(f"{'offline':<22} {'pool':>7} {'tok/s':>9} {'ratio':>6} {'peak run':>8} {'blocks freed':>12}")
        for row in report["offline"]:
            lines.append(
                f"{row['setting']:<22} {row['pool_tokens']:>7} {row['output_tok_s']:>9.1f} {row['speed_ratio']:>6.2f} "
                f"{row['peak_running_requests']:>8} {row['eviction']['blocks_freed']:>12}"
            )
    if report["online"]:
        lines.append(f"{'online':<22} {'load':>12} {'tok/s':>9} {'ratio':>6} {'TTFT p50':>9} {'TPOT p50':>9} {'peak run':>8}")
        for row in report["online"]:
            lines.append(
                f"{row['setting']:<22} {rate_label(row['request_rate']):>12} {row['output_tok_s']:>9.1f} "
                f"{row['speed_ratio']:>6.2f} {row['ttft_ms']['p50'] or 0:>9.1f} {row['tpot_ms']['p50'] or 0:>9.1f} "
                f"{row['peak_running_requests']:>8}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
