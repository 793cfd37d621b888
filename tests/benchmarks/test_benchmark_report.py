"""benchmarks.report: the README section comes from the result files, and the committed one is current."""

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAD, TAIL = "# project\n\n## Benchmark results\n\n", "<!-- benchmark-results:end -->\n\n## Layout\n"
README = HEAD + "<!-- benchmark-results:begin -->\nstale\n" + TAIL


def test_committed_readme_section_is_generated_from_committed_results(monkeypatch):
    from benchmarks import report

    monkeypatch.chdir(ROOT)
    assert report.main(["--check"]) == 0, "README.md is stale: run `python -m benchmarks.report`"


def test_section_summarises_each_result_with_model_device_and_plots(
    tmp_path, throughput_smoke, ruler_smoke, needle_smoke, long_generation_smoke
):
    from benchmarks import report

    results = tmp_path / "benchmarks" / "results"
    smokes = (("throughput", throughput_smoke), ("ruler", ruler_smoke), ("needle", needle_smoke),
              ("long-generation", long_generation_smoke))
    for kind, (path, result) in smokes:
        (results / kind).mkdir(parents=True)
        for name in [path.name, *result["plots"]]:
            shutil.copy(path.parent / name, results / kind / name)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    arguments = ["--results", str(results), "--readme", str(readme), "--include-smoke"]
    assert report.main(arguments) == 0
    text = readme.read_text()
    assert text.startswith(HEAD) and text.endswith(TAIL)
    assert "stale" not in text
    for title in ("### Throughput under a KV-memory budget: `smoke`", "### RULER: `smoke`", "### Needle in a haystack: `smoke`",
                  "### Long generation (decode-time eviction): `smoke`"):
        assert title in text
    assert text.count("Model: SmolLM2-135M-Instruct (Q4_1 GGUF") == 4 and text.count("Device: cpu") == 4
    assert "| snapkv@64 | 1536 |" in text and "| snapkv | " in text and "| snapkv@128 | " in text
    assert "| gkv@64 | " in text and "| streamingllm-decode@64 | " in text
    for line in text.splitlines():
        for link in [part.split(")")[0] for part in line.split("](")[1:]]:
            assert (readme.parent / link).is_file(), link
    assert report.main(arguments + ["--check"]) == 0
    # without --include-smoke a CPU smoke run is no result
    assert report.main(arguments[:-1]) == 0
    assert "No benchmark results are committed yet" in readme.read_text()


def test_readme_without_markers_is_refused(tmp_path):
    from benchmarks import report

    readme = tmp_path / "README.md"
    readme.write_text("# project\n")
    with pytest.raises(SystemExit, match="benchmark-results:begin"):
        report.main(["--results", str(tmp_path), "--readme", str(readme)])


def test_ruler_overview_joins_runs_split_by_policy():
    """Two RULER runs of one setting (split by policy) make one table per protocol with
    every policy, full KV from the runs, and Judge Q's lead over SnapKV."""
    from benchmarks.report import ruler_overview

    def run(policies, scores):
        rows = [{"policy": "vanilla", "budget": None, "protocol": "full", "seq_len": 4096, "average": 35.0}]
        rows += [{"policy": p, "budget": b, "protocol": "query_agnostic", "seq_len": 4096, "average": scores[p][i]}
                 for p in policies for i, b in enumerate([128, 0.5])]
        return {"config": "smollm2", "data": {"num_samples": 10}, "budgets": [128], "ratios": [0.5], "results": rows}

    scores = {"judgeq": [5.0, 20.0], "snapkv": [4.0, 22.5], "h2o": [1.0, 2.0]}
    lines = ruler_overview([run(["judgeq", "snapkv"], scores), run(["h2o"], scores)])
    text = "\n".join(lines)
    assert "4096 tokens, query-agnostic" in text and "full KV: 35.0" in text
    assert "| h2o | 1.0 | 2.0 |" in lines and "| judgeq - snapkv | +1.0 | -2.5 |" in lines
    # a single run's own table says it all: no overview
    assert ruler_overview([run(["judgeq", "snapkv"], scores)]) == []


def test_throughput_overview_joins_runs_split_by_policy():
    """Two offline runs of one workload and pool make one table with each policy's own
    run's vanilla beside it, fastest first; a lone run has its own section only."""
    from benchmarks.report import throughput_overview

    def run(vanilla, policies):
        rows = [{"policy": "vanilla", "setting": "vanilla", "pool_tokens": 100, "output_tok_s": vanilla, "speed_ratio": 1.0}]
        rows += [{"policy": p, "setting": f"{p}@64", "pool_tokens": 100, "output_tok_s": tok_s,
                  "speed_ratio": tok_s / vanilla, "peak_running_requests": 9, "eviction": {"blocks_freed": 7}}
                 for p, tok_s in policies.items()]
        workload = {"num_requests": 4, "prompt_len": 300, "output_len": 10}
        return {"config": "smoke", "device": "cpu", "workload": workload, "offline": rows}

    lines = throughput_overview([run(10.0, {"judgeq": 31.0}), run(11.0, {"snapkv": 33.0, "h2o": 22.0})])
    table = [line for line in lines if line.startswith("| ") and "@64" in line]
    assert table == ["| judgeq@64 | 31.0 | 10.0 | 3.10 | 9 | 7 |", "| snapkv@64 | 33.0 | 11.0 | 3.00 | 9 | 7 |",
                     "| h2o@64 | 22.0 | 11.0 | 2.00 | 9 | 7 |"]
    assert "4 x (300, 10), KV pool 100 tokens" in lines[0]
    assert throughput_overview([run(10.0, {"judgeq": 31.0})]) == []
