"""How many prompt tokens a request keeps per kv head: an absolute budget or a ratio."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVBudget:
    """A per-request KV budget, counted per (layer, kv head) over the prompt tokens.

    Exactly one of the two forms is set:

    - ``tokens``: keep at most this many prompt tokens per head (KVCache-Factory's
      ``max_capacity_prompt``, TriAttention's ``budget``);
    - ``ratio``: the fraction of the prompt's KV *removed* (kvpress's
      ``compression_ratio``: 0.75 keeps a quarter), kept count ``int(n * (1 - ratio))``.

    Prompts not longer than the kept count are not evicted at all.
    """

    tokens: int | None = None
    ratio: float | None = None

    def __post_init__(self):
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError("a KV budget is either a token count or a compression ratio, exactly one of them")
        if self.tokens is not None and (isinstance(self.tokens, bool) or self.tokens <= 0):
            raise ValueError(f"KV budget must be a positive token count, got {self.tokens!r}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(
                f"compression ratio must be in [0, 1) (the fraction of KV removed), got {self.ratio!r}"
            )

    @classmethod
    def parse(cls, value: int | float | str) -> "KVBudget":
        """``1024`` or ``"1024"`` is a token budget; ``0.75`` or ``"0.75"`` a ratio."""
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError(
                        f"KV budget {text!r} is neither a token count (e.g. 1024) nor a ratio (e.g. 0.75)"
                    ) from None
        if isinstance(value, bool):
            raise ValueError(f"KV budget must be a number, got {value!r}")
        if isinstance(value, int):
            return cls(tokens=value)
        return cls(ratio=float(value))

    def keep_count(self, num_candidates: int) -> int:
        """Prompt tokens kept per head for a prompt of ``num_candidates`` tokens."""
        if self.tokens is not None:
            return min(self.tokens, num_candidates)
        return max(1, int(num_candidates * (1.0 - self.ratio))) if num_candidates else 0

    def evicts(self, num_candidates: int) -> bool:
        return self.keep_count(num_candidates) < num_candidates

    def __str__(self) -> str:
        return f"{self.tokens} tokens" if self.tokens is not None else f"ratio {self.ratio}"
