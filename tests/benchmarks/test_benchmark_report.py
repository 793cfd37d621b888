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
