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
    admits a waiting request only where the scheduler's look-ahead says it fits."""

    eviction_plans: dict[str, EvictionPlan]
    # (candidate, its new tokens) -> whether admitting it keeps the pool ahead (the scheduler's)
    admission_fits: Callable[[Request, int], bool]

    def allocate_slots(
        self, request: Request, num_new_tokens: int, *args: Any, has_scheduled_reqs: bool = True, **kwargs: Any
    ) -> KVCacheBlocks | None:
        # vLLM's own watermark gates the same admissions: waiting or preempted requests
        # while others run (running requests allocate as usual, never held back); None
        # is vLLM's "cannot be scheduled" and ends this step's admissions
        admitting = has_scheduled_reqs and request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        if admitting and not self.admission_fits(request, num_new_tokens):
            return None
        return super().allocate_slots(request, num_new_tokens, *args, has_scheduled_reqs=has_scheduled_reqs, **kwargs)

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
