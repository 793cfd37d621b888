"""benchmarks.throughput_combine: offline runs split by KV pool, joined into one result file."""

import json
from pathlib import Path

import pytest

DEVICE = "NVIDIA H100 80GB HBM3"
PNG = b"\x89PNG\r\n\x1a\n"


def row(policy, budget, pool, tok_s, ratio):
    """An offline row of benchmarks.throughput (the fields the tables and plots read, and a few more)."""
    return {
        "setting": "vanilla" if policy == "vanilla" else f"{policy}@{budget}", "policy": policy, "budget": budget,
        "pool_tokens": pool, "wall_s": 100.0, "requests": 64, "output_tok_s": tok_s, "total_tok_s": tok_s * 9,
        "peak_running_requests": 8 if policy == "vanilla" else 32, "peak_waiting_requests": 56, "peak_kv_usage": 0.99,
        "preemptions": 0, "eviction": {"blocks_freed": 0 if policy == "vanilla" else 27904,
                                       "freed_gib": 0.0 if policy == "vanilla" else 54.5},
        "pool_blocks": pool // 16, "speed_ratio": ratio,
    }


def run_report(tag, commit, date, rows, reference_pool, **changes):
    """A result of benchmarks.throughput --modes offline, shaped like the committed 8B-shape ones."""
    report = {
        "device": DEVICE, "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0", "vllm": "0.26.0",
        "git_commit": commit, "command": f"python -m benchmarks.throughput --config llama8b-shape --tag {tag}",
        "date": date, "kind": "throughput", "config": "llama8b-shape", "tag": tag,
        "model": {"key": "llama8b-shape", "description": "Llama-3.1-8B-Instruct shape", "path": ".gpu/llama8b",
                  "dtype": "bfloat16"},
        "workload": {"num_requests": 64, "online_requests": 128, "prompt_len": 8000, "output_len": 1024, "seed": 0,
                     "prompts": "random ordinary token ids; greedy; ignore_eos"},
        "engine": {"model": ".gpu/llama8b", "dtype": "bfloat16", "block_size": 16,
                   "kv_cache_memory_bytes": "pool_tokens x kv_bytes_per_token", "max_num_seqs": 256},
        "kv_bytes_per_token": 131072, "reference": {"pool_tokens": reference_pool, "budget": 1024},
        "request_rates": [4.0, "inf"], "notes": "speed_ratio: ...", "soft_tokens": "random embeddings",
        "offline": rows, "online": [], "online_servers": [], "plots": [],
    }
    return report | changes


def write_run(folder: Path, report: dict) -> Path:
    path = folder / f"llama8b-shape-{report['tag']}-NVIDIA-H100-80GB-HBM3-{report['date'][:10].replace('-', '')}.json"
    path.write_text(json.dumps(report))
    return path


@pytest.fixture
def pool_runs(tmp_path):
    """The reference pool's run (two budgets) and a smaller pool's run a day later, at another commit."""
    reference = run_report("judgeq", "b959d19", "2026-11-24T21:14:23+00:00", [
        row("vanilla", None, 65536, 635.7, 1.0), row("judgeq", 512, 65536, 2095.7, 3.2969),
        row("judgeq", 1024, 65536, 2012.7, 3.1662)], reference_pool=65536)
    small = run_report("judgeq-pool49152", "d7b955f", "2026-11-25T03:17:45+00:00", [
        row("vanilla", None, 49152, 509.9, 1.0), row("judgeq", 1024, 49152, 1707.9, 3.3494)], reference_pool=49152)
    return write_run(tmp_path, reference), write_run(tmp_path, small)


def combine(files, *extra):
    from benchmarks import throughput_combine

    path = throughput_combine.main(["--tag", "judgeq-pool-sweep", *extra, *map(str, files)])
    return path, json.loads(path.read_text())


def test_pool_split_runs_make_one_result_with_each_runs_ratios(pool_runs, capsys):
    path, report = combine(pool_runs)
    assert path.parent == pool_runs[0].parent
    assert path.name == "llama8b-shape-judgeq-pool-sweep-NVIDIA-H100-80GB-HBM3-20261125.json"
    assert [(r["setting"], r["pool_tokens"], r["speed_ratio"]) for r in report["offline"]] == [
        ("vanilla", 49152, 1.0), ("judgeq@1024", 49152, 3.3494),
        ("vanilla", 65536, 1.0), ("judgeq@512", 65536, 3.2969), ("judgeq@1024", 65536, 3.1662),
    ]
    assert (report["kind"], report["config"], report["tag"]) == ("throughput", "llama8b-shape", "judgeq-pool-sweep")
    assert report["git_commit"] == "b959d19+d7b955f" and report["date"] == "2026-11-25T03:17:45+00:00"
    assert report["reference"] == {"pool_tokens": 65536, "budget": 1024}
    assert report["command"] == f"python -m benchmarks.throughput_combine --tag judgeq-pool-sweep {pool_runs[0]} {pool_runs[1]}"
    assert report["sources"] == [
        {"file": pool_runs[0].name, "git_commit": "b959d19", "date": "2026-11-24T21:14:23+00:00",
         "command": "python -m benchmarks.throughput --config llama8b-shape --tag judgeq"},
        {"file": pool_runs[1].name, "git_commit": "d7b955f", "date": "2026-11-25T03:17:45+00:00",
         "command": "python -m benchmarks.throughput --config llama8b-shape --tag judgeq-pool49152"},
    ]
    assert (report["online"], report["online_servers"], report["device"], report["vllm"]) == ([], [], DEVICE, "0.26.0")
    assert len(report["plots"]) == 3 and any(name.endswith("-tok-s-vs-pool.png") for name in report["plots"])
    for name in report["plots"]:
        assert (path.parent / name).read_bytes()[:8] == PNG
    table = capsys.readouterr().out
    assert "judgeq@1024              49152    1707.9   3.35" in table and f"wrote {path}" in table


def test_one_commit_is_named_once_and_out_puts_the_file_elsewhere(pool_runs, tmp_path):
    first = json.loads(pool_runs[0].read_text())
    same_commit = write_run(tmp_path, json.loads(pool_runs[1].read_text()) | {"git_commit": first["git_commit"]})
    path, report = combine([pool_runs[0], same_commit], "--out", str(tmp_path / "joined"))
    assert path.parent == tmp_path / "joined" and report["git_commit"] == "b959d19"
    assert all((path.parent / name).is_file() for name in report["plots"])


def test_runs_of_another_device_are_refused(pool_runs, tmp_path):
    other = write_run(tmp_path, json.loads(pool_runs[1].read_text()) | {"device": "NVIDIA H200", "tag": "h200"})
    with pytest.raises(SystemExit, match="differ in device: 'NVIDIA H100 80GB HBM3' .* vs 'NVIDIA H200'"):
        combine([pool_runs[0], other])


def test_a_setting_measured_twice_is_refused(pool_runs, tmp_path):
    again = json.loads(pool_runs[0].read_text()) | {"tag": "judgeq-again"}
    again["offline"] = [r for r in again["offline"] if r["setting"] != "judgeq@512"]
    again_path = write_run(tmp_path, again)
    with pytest.raises(SystemExit, match=f"vanilla on KV pool 65536 tokens is in both {pool_runs[0].name} and "
                                         f"{again_path.name}"):
        combine([pool_runs[0], again_path])


def test_online_runs_are_refused(pool_runs, tmp_path):
    online = json.loads(pool_runs[1].read_text()) | {"tag": "online"}
    online["online"] = [row("vanilla", None, 49152, 400.0, 1.0) | {"request_rate": "inf"}]
    with pytest.raises(SystemExit, match="has online rows: only offline runs"):
        combine([pool_runs[0], write_run(tmp_path, online)])


def test_report_shows_the_joined_file_in_place_of_its_sources(pool_runs, tmp_path):
    from benchmarks.report import latest_results

    results = tmp_path / "results"
    (results / "throughput").mkdir(parents=True)
    inputs = [write_run(results / "throughput", json.loads(path.read_text())) for path in pool_runs]
    other = write_run(results / "throughput", json.loads(pool_runs[1].read_text()) | {"tag": "snapkv"})
    joined, _ = combine(inputs)
    assert [path.name for path, _ in latest_results(results, include_smoke=False)] == [joined.name, other.name]
