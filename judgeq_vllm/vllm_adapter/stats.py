"""Aggregate eviction counters of one engine (kept by the scheduler, in EngineCore).

They leave EngineCore only through the ``judgeq_stats`` utility (``as_dict``): the log
line, tests, and the front end's Prometheus collector (``metrics.py``) all read that.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from .plan import EvictionPlan

# fraction of a compacted prompt's KV removed
COMPRESSION_RATIO_BOUNDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# worker time per step spent scoring and compacting (CPU steps reach seconds on long prompts)
EVICTION_SECONDS_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    """Observations counted per bucket, Prometheus style (bucket ``i`` holds values
    ``<= bounds[i]`` and above the previous bound; the last bucket is ``+Inf``).

    Attributes:
        bounds: the buckets' upper bounds, ascending.
        counts: observations per bucket, ``len(bounds) + 1`` entries.
        total: the sum of all observations.
    """

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self):
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def as_dict(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total, "count": sum(self.counts)}


@dataclass
class EvictionStats:
    """Counters since the engine started.

    Attributes:
        requests_by_policy: requests admitted, by the policy that plans them (``none``
            for those served without eviction, whatever the reason).
        requests_evicted: requests whose prompt was compacted (a preempted and resumed
            request counts once per compaction).
        requests_skipped: requests served without eviction, by reason.
        prompt_tokens: prompt tokens of the compacted requests.
        tokens_evicted: prompt rows dropped per (layer, kv head), summed over requests.
        soft_tokens_appended: soft tokens added to prompts inside the engine.
        blocks_freed: blocks that went back to the free pool after compaction steps.
        decode_compactions: decode-time policies' compactions (G-KV, streamingllm-decode;
            their compaction of the prompt at the prefill included).
        decode_rows_evicted: rows per (layer, kv head) those dropped, summed.
        compression_ratio: per compaction, the fraction of the candidates' KV removed.
        eviction_seconds: per step that compacted, the worker's time scoring and compacting.
    """

    requests_by_policy: Counter = field(default_factory=Counter)
    requests_evicted: int = 0
    requests_skipped: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    tokens_evicted: int = 0
    soft_tokens_appended: int = 0
    blocks_freed: int = 0
    decode_compactions: int = 0
    decode_rows_evicted: int = 0
    compression_ratio: Histogram = field(default_factory=lambda: Histogram(COMPRESSION_RATIO_BOUNDS))
    eviction_seconds: Histogram = field(default_factory=lambda: Histogram(EVICTION_SECONDS_BOUNDS))

    def record_admission(self, policy: str, skip_reason: str | None) -> None:
        """A new request, planned with ``policy`` or skipped for ``skip_reason``."""
        if skip_reason is None:
            self.requests_by_policy[policy] += 1
        else:
            self.requests_by_policy["none"] += 1
            self.requests_skipped[skip_reason] += 1

    def record_compaction(self, plan: EvictionPlan, blocks_freed: int) -> None:
        self.requests_evicted += 1
        self.prompt_tokens += plan.prompt_len
        self.tokens_evicted += plan.prompt_len - plan.keep
        self.blocks_freed += blocks_freed
        self.compression_ratio.observe(1.0 - plan.keep / plan.prompt_len)

    def record_decode_compaction(self, rows_evicted: int, blocks_freed: int) -> None:
        self.decode_compactions += 1
        self.decode_rows_evicted += rows_evicted
        self.blocks_freed += blocks_freed

    @property
    def overall_compression_ratio(self) -> float:
        """Fraction of the compacted prompts' KV removed (0 when nothing was compacted)."""
        return self.tokens_evicted / self.prompt_tokens if self.prompt_tokens else 0.0

    def summary(self) -> dict:
        """``as_dict`` without the histograms: the log line."""
        return {key: value for key, value in self.as_dict().items() if not key.endswith("_histogram")}

    def as_dict(self) -> dict:
        return {
            "requests_by_policy": dict(self.requests_by_policy),
            "requests_evicted": self.requests_evicted,
            "requests_skipped": dict(self.requests_skipped),
            "prompt_tokens": self.prompt_tokens,
            "tokens_evicted": self.tokens_evicted,
            "soft_tokens_appended": self.soft_tokens_appended,
            "blocks_freed": self.blocks_freed,
            "decode_compactions": self.decode_compactions,
            "decode_rows_evicted": self.decode_rows_evicted,
            "compression_ratio": round(self.overall_compression_ratio, 4),
            "compression_ratio_histogram": self.compression_ratio.as_dict(),
            "eviction_seconds_histogram": self.eviction_seconds.as_dict(),
        }
