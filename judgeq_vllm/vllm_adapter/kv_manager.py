"""KV-cache manager subclasses: prefix-cache hits and hashing stop where compaction writes.

The scheduler swaps the classes of its own manager objects to these (``__class__``
assignment after ``Scheduler.__init__``): they add behaviour, no state of their own,
and read the scheduler's plans through ``eviction_plans``. Registering a manager for
``FullAttentionSpec`` in vLLM's spec registry instead would change every engine of the
process and trips its conflicting-registration check (vLLM 0.26 delta doc §0.2).
"""

from __future__ import annotations

from typing import Any, Callable

from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.request import Request, RequestStatus

from .plan import EvictionPlan


class EvictionKVCacheManager(KVCacheManager):
    """Caps prefix-cache hits of planned requests at ``EvictionPlan.prefix_hit_cap``, and
    keeps the scheduler's admission reserve free when it admits a waiting request."""

    eviction_plans: dict[str, EvictionPlan]
    # (candidate, its new tokens) -> blocks the evicting requests may still take (the scheduler's)
    admission_reserve: Callable[[Request, int], int]

    def allocate_slots(
        self, request: Request, num_new_tokens: int, *args: Any, reserved_blocks: int = 0, has_scheduled_reqs: bool = True, **kwargs: Any
    ) -> KVCacheBlocks | None:
        # vLLM's own watermark gates the same admissions: waiting or preempted requests
        # while others run (running requests allocate as usual, never held back)
        if has_scheduled_reqs and request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            reserved_blocks += self.admission_reserve(request, num_new_tokens)
        return super().allocate_slots(
            request, num_new_tokens, *args, reserved_blocks=reserved_blocks, has_scheduled_reqs=has_scheduled_reqs, **kwargs
        )

    def get_computed_blocks(self, request: Request) -> tuple[KVCacheBlocks, int, int]:
        blocks, num_hit_tokens, shared_prefix_boundary = super().get_computed_blocks(request)
        plan = self.eviction_plans.get(request.request_id)
        if plan is None or num_hit_tokens <= plan.prefix_hit_cap:
            return blocks, num_hit_tokens, shared_prefix_boundary
        # hits are whole blocks of the single full-attention group; nothing is taken yet
        # (allocate_slots takes them), so trimming the list is enough
        num_blocks = plan.prefix_hit_cap // plan.block_size
        trimmed = self.create_kv_cache_blocks(tuple(list(group[:num_blocks]) for group in blocks.blocks))
        return trimmed, num_blocks * plan.block_size, 0


class EvictionFullAttentionManager(FullAttentionManager):
    """Never hashes a planned request's blocks from ``S`` on: they hold compacted rows
    after the compaction step, whatever their token hashes say. Head blocks keep their
    true prompt KV and stay reusable by prefix caching, also after they are freed."""

    eviction_plans: dict[str, EvictionPlan]

    def cache_blocks(self, request: Request, num_tokens: int, retention_interval: int | None = None) -> None:
        plan = self.eviction_plans.get(request.request_id)
        if plan is not None:
            num_tokens = min(num_tokens, plan.first_kept_slot)
        super().cache_blocks(request, num_tokens, retention_interval=retention_interval)

    def free_head_blocks(self, request_id: str, plan: EvictionPlan) -> None:
        """Returns blocks ``[0, S / bs)`` to the pool, null-blocking their table entries
        (the sliding-window precedent); idempotent."""
        self._remove_blocks_in_range(request_id, 0, plan.freed_blocks)
