"""Benchmark commands, run from the repository root (see benchmarks/README.md):

    python -m benchmarks.throughput --config smoke|smollm2|llama8b-shape
    python -m benchmarks.ruler --config smoke|smollm2
    python -m benchmarks.needle --config smoke|smollm2
    python -m benchmarks.report            # README results section from benchmarks/results/
"""
