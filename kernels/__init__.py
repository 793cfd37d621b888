"""Triton kernels of the eviction hot path: soft-query scoring over a paged KV cache and
in-place compaction of the kept rows. Shapes, layout and math: README.md beside this file.

Triton decides at import time whether kernels run compiled or in the interpreter
(TRITON_INTERPRET=1), so set that variable before importing this package.
"""

from .compact import compact_paged, naive_compact_paged
from .score import ScoreConfig, naive_score_paged, score_paged

__all__ = [
    "ScoreConfig",
    "compact_paged",
    "naive_compact_paged",
    "naive_score_paged",
    "score_paged",
]
