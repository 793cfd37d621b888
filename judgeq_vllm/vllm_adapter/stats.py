"""Aggregate eviction counters of one engine (kept by the scheduler, in EngineCore)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .plan import EvictionPlan


@dataclass
class EvictionStats:
    """Counters since the engine started.

    Attributes:
        requests_evicted: requests whose prompt was compacted (a preempted and resumed
            request counts once per compaction).
        requests_skipped: requests served without eviction, by reason.
        prompt_tokens: prompt tokens of the compacted requests.
        tokens_evicted: prompt rows dropped per (layer, kv head), summed over requests.
        soft_tokens_appended: soft tokens added to prompts inside the engine.
        blocks_freed: blocks that went back to the free pool after compaction steps.
    """

    requests_evicted: int = 0
    requests_skipped: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    tokens_evicted: int = 0
    soft_tokens_appended: int = 0
    blocks_freed: int = 0

    def record_compaction(self, plan: EvictionPlan, blocks_freed: int) -> None:
        self.requests_evicted += 1
        self.prompt_tokens += plan.prompt_len
        self.tokens_evicted += plan.prompt_len - plan.keep
        self.blocks_freed += blocks_freed

    @property
    def compression_ratio(self) -> float:
        """Fraction of the compacted prompts' KV removed (0 when nothing was compacted)."""
        return self.tokens_evicted / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict:
        return {
            "requests_evicted": self.requests_evicted,
            "requests_skipped": dict(self.requests_skipped),
            "prompt_tokens": self.prompt_tokens,
            "tokens_evicted": self.tokens_evicted,
            "soft_tokens_appended": self.soft_tokens_appended,
            "blocks_freed": self.blocks_freed,
            "compression_ratio": round(self.compression_ratio, 4),
        }
