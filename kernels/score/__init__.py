from .naive import naive_score_paged
from .triton import ScoreConfig, score_paged

__all__ = ["ScoreConfig", "naive_score_paged", "score_paged"]
