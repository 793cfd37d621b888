"""benchmarks.throughput: the grid, the client's arithmetic, and the CPU smoke run's output."""

import math

import pytest

from judgeq_vllm.policies import KVBudget, make_policy
from judgeq_vllm.vllm_adapter import plan_request

PROMPT_LEN, OUTPUT_LEN, REQUESTS, POOL_TOKENS, BUDGET = 320, 12, 6, 1536, 64


def snapkv_plan():
    return plan_request(PROMPT_LEN, make_policy("snapkv"), KVBudget(tokens=BUDGET), 16, num_layers=30)


def test_offline_grid_sweeps_budgets_on_the_reference_pool_and_pools_at_the_reference_budget():
    from benchmarks.throughput import offline_runs

    budgets = [KVBudget(tokens=t) for t in (128, 256, 512)]
    runs = offline_runs(["snapkv", "knorm"], budgets, [1000, 2000, 4000])
    assert [(r.engine.label, r.pool_tokens) for r in runs[:3]] == [("vanilla", 1000), ("vanilla", 2000), ("vanilla", 4000)]
    snapkv = {run.pool_tokens: [b.label for b in run.batches] for run in runs if run.engine.policy == "snapkv"}
    assert snapkv == {1000: ["snapkv@256"], 2000: ["snapkv@128", "snapkv@256", "snapkv@512"], 4000: ["snapkv@256"]}
    # one engine per (policy, pool), started at the reference budget; batches set theirs per request
    assert {run.engine.label for run in runs if run.engine.policy} == {"snapkv@256", "knorm@256"}
    assert len(runs) == 3 + 2 * 3


def test_engine_arguments_become_serve_flags():
    from benchmarks.serving import engine_flags

    arguments = {"model": "/m", "enforce_eager": True, "enable_prefix_caching": False, "max_model_len": 380, "seed": None}
    flags = engine_flags(arguments)
    assert flags == ["--model", "/m", "--enforce-eager", "--no-enable-prefix-caching", "--max-model-len", "380"]


def test_latency_summary_in_milliseconds():
    from benchmarks.serving import latency_summary

    summary = latency_summary([0.001, 0.002, 0.003, 0.010])
    assert summary["mean"] == 4.0 and summary["p50"] == 2.5 and summary["p90"] == pytest.approx(7.9)
    assert latency_summary([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def metrics_text(running, usage, preemptions, blocks_freed=None):
    text = (
        f'vllm:num_requests_running{{engine="0",model_name="bench"}} {running}\n'
        f'vllm:kv_cache_usage_perc{{engine="0",model_name="bench"}} {usage}\n'
        "# TYPE vllm:num_preemptions counter\n"
        f'vllm:num_preemptions_total{{engine="0",model_name="bench"}} {preemptions}\n'
    )
    if blocks_freed is not None:
        text += "# TYPE judgeq:blocks_freed counter\n"
        text += f'judgeq:blocks_freed_total{{engine="0",model_name="bench"}} {blocks_freed}\n'
    return text


def test_metrics_samples_keep_peaks_and_counter_increases():
    from benchmarks.serving import MetricsPeaks

    peaks = MetricsPeaks()
    for sample in (metrics_text(0, 0.0, 3, 10), metrics_text(5, 0.7, 4, 40), metrics_text(2, 0.2, 6, 55)):
        peaks.add(sample)
    assert (peaks.peak_running, peaks.peak_kv_usage, peaks.increase("vllm:num_preemptions_total")) == (5, 0.7, 3)
    assert peaks.eviction() == {"requests_evicted": None, "tokens_evicted": None, "blocks_freed": 45}
    vanilla = MetricsPeaks()
    vanilla.add(metrics_text(1, 0.1, 0))
    assert vanilla.eviction() is None


def test_speed_ratios_are_against_vanilla_at_the_same_pool():
    from benchmarks.throughput import add_speed_ratios

    rows = [
        {"policy": "vanilla", "pool_tokens": 1, "output_tok_s": 10.0},
        {"policy": "vanilla", "pool_tokens": 2, "output_tok_s": 20.0},
        {"policy": "snapkv", "pool_tokens": 1, "output_tok_s": 15.0},
        {"policy": "snapkv", "pool_tokens": 2, "output_tok_s": 30.0},
    ]
    add_speed_ratios(rows, "pool_tokens")
    assert [row["speed_ratio"] for row in rows] == [1.0, 1.0, 1.5, 1.5]


def test_offline_grid_checkpoints_every_engine_with_its_ratios(monkeypatch, tmp_path):
    """A run cut short by a host's time limit keeps each finished engine's rows, ratios included."""
    import benchmarks.offline
    from benchmarks.throughput import CONFIGS, Run, run_offline_grid

    def fake_run_offline(engine_kwargs, batches, prompts, output_len):
        speed = 10.0 if batches[0].policy is None else 30.0
        return [{"output_tok_s": speed, "eviction": {"blocks_freed": 2}} for _ in batches]

    monkeypatch.setattr(benchmarks.offline, "run_offline", fake_run_offline)
    monkeypatch.setattr("benchmarks.throughput.kv_bytes_per_token", lambda model_dir, dtype: 1024)
    run = Run(
        config=CONFIGS["smoke"], model_dir=tmp_path, soft_tokens=None, budgets=[KVBudget(tokens=64)],
        pools=[1536], enforce_eager=True, extra_engine_args={}, seed=0,
    )
    rows, seen = [], []
    run_offline_grid(run, [[1, 2, 3]], rows, lambda: seen.append([(r["policy"], r["speed_ratio"]) for r in rows]))
    assert seen == [[("vanilla", 1.0)], [("vanilla", 1.0), ("snapkv", 3.0)]]


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_a_pool_holds_the_same_tokens_at_any_tensor_parallel_size(monkeypatch, tmp_path, ranks):
    from benchmarks.throughput import CONFIGS, Run

    monkeypatch.setattr("benchmarks.throughput.kv_bytes_per_token", lambda model_dir, dtype: 1024)
    extra = {} if ranks == 1 else {"tensor_parallel_size": ranks}
    run = Run(config=CONFIGS["smoke"], model_dir=tmp_path, soft_tokens=None, budgets=[KVBudget(tokens=64)],
              pools=[1536], enforce_eager=True, extra_engine_args=extra, seed=0)
    # per worker: each of the ranks holds 1/ranks of every token's KV
    assert run.engine_kwargs(1536)["kv_cache_memory_bytes"] == 1536 * 1024 // ranks


def test_in_process_engines_are_refused_on_a_gpu(monkeypatch):
    import torch

    from benchmarks.throughput import refuse_in_process_cuda_engines

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="vllm-project/vllm#28426"):
        refuse_in_process_cuda_engines()
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    refuse_in_process_cuda_engines()  # vLLM's default: an EngineCore process per engine


def test_smoke_result_records_where_it_comes_from(throughput_smoke):
    path, report = throughput_smoke
    assert report["kind"] == "throughput" and report["config"] == "smoke"
    assert report["device"].startswith("cpu") and report["vllm"] == "0.26.0" and "git_commit" in report
    assert report["command"].startswith("python -m benchmarks.throughput --config smoke")
    assert "Q4_1" in report["model"]["description"]
    assert path.name.startswith("smoke-cpu-") and path.suffix == ".json"
    assert not list(path.parent.glob("*.partial.json"))  # the checkpoint goes once the run is complete


def test_smoke_offline_frees_the_planned_blocks_and_runs_more_requests_together(throughput_smoke):
    _, report = throughput_smoke
    rows = {row["setting"]: row for row in report["offline"]}
    assert set(rows) == {"vanilla", f"snapkv@{BUDGET}"}
    for row in rows.values():
        assert (row["requests"], row["prompt_tokens"]) == (REQUESTS, REQUESTS * PROMPT_LEN)
        assert row["output_tokens"] == REQUESTS * OUTPUT_LEN
        assert row["pool_blocks"] == POOL_TOKENS // 16 and row["output_tok_s"] > 0 and row["preemptions"] >= 0
    vanilla, snapkv = rows["vanilla"], rows[f"snapkv@{BUDGET}"]
    assert vanilla["eviction"]["blocks_freed"] == 0 and vanilla["speed_ratio"] == 1.0
    assert snapkv["eviction"]["requests_evicted"] == REQUESTS
    assert snapkv["eviction"]["blocks_freed"] == REQUESTS * snapkv_plan().freed_blocks > 0
    assert snapkv["eviction"]["freed_gib"] > 0 and snapkv["speed_ratio"] > 0
    # a full request holds ceil(332 / 16) = 21 of the 96 blocks: vanilla fits 4 at once
    assert vanilla["peak_running_requests"] <= (POOL_TOKENS // 16) // math.ceil((PROMPT_LEN + OUTPUT_LEN) / 16)
    assert snapkv["peak_running_requests"] > vanilla["peak_running_requests"]


def test_smoke_online_completes_every_request_with_latencies_and_eviction(throughput_smoke):
    _, report = throughput_smoke
    assert {(row["setting"], row["request_rate"]) for row in report["online"]} == {
        (setting, rate) for setting in ("vanilla", f"snapkv@{BUDGET}") for rate in (8.0, "inf")
    }
    for row in report["online"]:
        assert (row["completed"], row["failed"]) == (REQUESTS, 0), row["first_error"]
        assert row["output_tokens_per_request"] == [OUTPUT_LEN] and row["prompt_tokens"] == REQUESTS * PROMPT_LEN
        assert row["ttft_ms"]["p50"] > 0 and row["tpot_ms"]["p50"] > 0 and row["itl_ms"]["p99"] >= row["itl_ms"]["p50"]
        assert row["peak_running_requests"] >= 1 and row["output_tok_s"] > 0 and row["speed_ratio"] > 0
        if row["policy"] == "vanilla":
            assert row["eviction"] is None and row["speed_ratio"] == 1.0
        else:
            assert row["eviction"]["requests_evicted"] == REQUESTS
            assert row["eviction"]["blocks_freed"] == REQUESTS * snapkv_plan().freed_blocks
    servers = {server["policy"]: server for server in report["online_servers"]}
    assert all(server["exit_code"] == 0 for server in servers.values())
    # two loads of six; the 16-token warm-up fits the budget and is not evicted
    assert servers["snapkv"]["eviction_totals"]["requests_evicted"] == 2 * REQUESTS


def test_smoke_plots_are_written_next_to_the_result(throughput_smoke):
    path, report = throughput_smoke
    assert len(report["plots"]) == 4
    for name in report["plots"]:
        assert (path.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
