"""The load and fault test (``benchmarks/load_test.py``) at CPU size, run as its own command.

96 concurrent streaming requests against a real server with a 33-block KV pool (small
enough that some requests are usually preempted, 7 in our runs): random prompt and output lengths, about 30% cancelled by the client,
some with invalid or valid per-request settings. The command checks the accounting, the
free block count and the server's health itself; this test reads its verdict.
"""

import json
import subprocess
import sys

import pytest

LOAD_TIMEOUT_S = 600
CPU_SIZE = [
    "--requests", "96", "--prompt-tokens", "16", "160", "--output-tokens", "8", "48", "--kv-budget", "32",
    "--deadline-s", "400", "--startup-timeout-s", "300",
]
CPU_SERVER = [
    "--dtype", "float32", "--enforce-eager", "--block-size", "16", "--max-model-len", "512",
    "--max-num-batched-tokens", "512", "--max-num-seqs", "32", "--kv-cache-memory-bytes", str(24 * 2**20),
]


@pytest.mark.slow
def test_load_with_cancellations_and_bad_requests_leaves_the_engine_whole(smollm2_dir, tmp_path):
    out = tmp_path / "load-test.json"
    command = [
        sys.executable, "-m", "benchmarks.load_test", "--model", smollm2_dir, *CPU_SIZE,
        "--out", str(out), "--server-log", str(tmp_path / "server.log"), "--", *CPU_SERVER,
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=LOAD_TIMEOUT_S)
    assert out.exists(), finished.stdout[-3000:] + finished.stderr[-3000:]
    result = json.loads(out.read_text())
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert not failed, f"{failed}: {json.dumps(result, indent=1)[:4000]}"
    assert finished.returncode == 0
    outcomes = result["outcomes"]
    # every kind of request really happened
    assert outcomes["completed"] > 0 and outcomes["cancelled"] > 0 and outcomes["rejected"] > 0
    assert 0 < result["cancelled_before_first_token"] < outcomes["cancelled"]
    assert result["requests_with_valid_settings"] > 0
    assert result["engine"]["compactions"] > 0 and result["engine"]["blocks_freed_by_compaction"] > 0
    assert result["provenance"]["vllm"] and result["provenance"]["git_commit"]
