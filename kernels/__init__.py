"""Triton kernels of the eviction hot path: soft-query scoring over a paged KV cache,
in-place compaction of the kept rows, and G-KV's key-similarity statistics. Shapes, layout and math: README.md beside this file.

Triton decides at import time whether kernels run compiled or in the interpreter
(TRITON_INTERPRET=1), so set that variable before importing this package.
"""

from .compact import compact_paged, naive_compact_paged
from .score import ScoreConfig, naive_score_paged, score_paged
from .similarity import naive_similarity_column_stats, similarity_column_stats

__all__ = [
    "ScoreConfig",
    "compact_paged",
    "naive_compact_paged",
    "naive_score_paged",
    "naive_similarity_column_stats",
    "score_paged",
    "similarity_column_stats",
]
