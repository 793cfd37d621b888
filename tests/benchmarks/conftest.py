"""The benchmarks' smoke configurations, each run once per session on CPU.

Engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: faster to start);
the online benchmark's servers get vLLM's real process layout regardless. Each fixture
returns the result file's path and its content.
"""

import json
import os
import sys
from pathlib import Path

# before vLLM is imported (as in tests/vllm_adapter/conftest.py)
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import pytest

ROOT = Path(__file__).resolve().parents[2]
# `benchmarks` is a package of the repository root, not an installed one
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _run(module, argv):
    path = module.main(argv)
    return path, json.loads(path.read_text())


@pytest.fixture(scope="session")
def throughput_smoke(smollm2_dir, tmp_path_factory):
    from benchmarks import throughput

    out = tmp_path_factory.mktemp("throughput")
    return _run(throughput, ["--config", "smoke", "--out", str(out)])


@pytest.fixture(scope="session")
def ruler_smoke(smollm2_dir, tmp_path_factory):
    from benchmarks import ruler

    out = tmp_path_factory.mktemp("ruler")
    # the samples go to the per-machine cache (RULER's generators take ~20 s; reruns reuse them)
    return _run(ruler, ["--config", "smoke", "--out", str(out)])


@pytest.fixture(scope="session")
def needle_data(smollm2_dir, tmp_path_factory):
    from benchmarks import needle

    path = tmp_path_factory.mktemp("needle-data") / "needle-smoke.json.gz"
    assert needle.main(["--config", "smoke", "--data", str(path), "--prepare-only"]) is None
    return path


@pytest.fixture(scope="session")
def needle_smoke(needle_data, tmp_path_factory):
    from benchmarks import needle

    out = tmp_path_factory.mktemp("needle")
    return _run(needle, ["--config", "smoke", "--data", str(needle_data), "--out", str(out)])


@pytest.fixture(scope="session")
def long_generation_smoke(smollm2_dir, tmp_path_factory):
    from benchmarks import long_generation

    out = tmp_path_factory.mktemp("long-generation")
    return _run(long_generation, ["--config", "smoke", "--out", str(out)])
