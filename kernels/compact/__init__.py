from .naive import naive_compact_paged
from .triton import compact_paged

__all__ = ["compact_paged", "naive_compact_paged"]
