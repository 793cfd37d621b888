from .naive import naive_similarity_column_stats
from .triton import similarity_column_stats

__all__ = ["naive_similarity_column_stats", "similarity_column_stats"]
