"""The GPU-host throughput script's host-side arithmetic (its runs need a GPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gpu_path_throughput import StepRecorder, combine  # noqa: E402


def test_step_periods_by_batch_separate_steps_with_jobs():
    recorder = StepRecorder.__new__(StepRecorder)  # the bookkeeping only, no CUDA hooks
    recorder.steps = [(None, 59, 59, 0), (None, 59, 59, 3), (None, 59, 59, 0), (None, 59, 59, 0), (None, 5, 5, 0)]
    by_batch = recorder._by_batch([10.0, 130.0, 12.0, 11.0])  # the last step has no successor
    assert by_batch == {"59": {"steps": 3, "median_ms": 11.0}, "59 with jobs": {"steps": 1, "median_ms": 130.0}}


def test_combine_gives_each_policy_its_ratio_to_vanilla():
    def record(policy, tok_s, wall):
        return {"command": f"run {policy}", "runs": [{"policy": policy, "output_tok_per_s": tok_s, "wall_s": wall}]}

    combined = combine([record("gkv", 2355.9, 217.33), record("vanilla", 1188.9, 430.66)])
    gkv = next(run for run in combined["runs"] if run["policy"] == "gkv")
    assert gkv["tok_per_s_ratio_to_vanilla"] == 1.982 and gkv["wall_ratio_to_vanilla"] == 0.505
    assert combined["commands"] == ["run gkv", "run vanilla"]
