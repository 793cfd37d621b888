"""The EngineCore side of decode-time eviction (G-KV, StreamingLLM's decode variant);
docs/engine-design.md §6.5.

On top of :class:`EvictionSchedulerMixin` (which still makes Judge Q's prefill plan for
``judgeq+gkv``), every request gets a :class:`GKVSchedule` when it is admitted. Each step
then carries, per request, the event that ends with it (``judgeq_gkv_jobs``), the query
rows of the next event's window it computes (G-KV only: ``judgeq_gkv_captures``, read by
the CPU runner; the GPU runner derives them on device from ``judgeq_gkv_first_events``,
the first event of each request it receives) and the layout its tokens read and write
(``judgeq_compacted``, the latest event's, in the one-shot plan's form so the worker's
offset rules apply unchanged). Chunks never cross an event, and the head blocks an event
empties go back to the pool once its step has been processed.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from .config import EvictionConfig
from .decode_plan import EVENT_FREE_LAG, GKVCapture, GKVJob, GKVSchedule, gkv_schedule, split_at_events, step_work
from .kv_manager import EvictionFullAttentionManager, EvictionKVCacheManager
from .scheduler import EvictionSchedulerMixin, logger


class GKVKVCacheManager(EvictionKVCacheManager):
    """Also caps prefix-cache hits of G-KV requests (``GKVSchedule.prefix_hit_cap``)."""

    gkv_schedules: dict[str, GKVSchedule]

    def get_computed_blocks(self, request: Request):
        blocks, num_hit_tokens, shared_prefix_boundary = super().get_computed_blocks(request)
        schedule = self.gkv_schedules.get(request.request_id)
        if schedule is None or num_hit_tokens <= schedule.prefix_hit_cap():
            return blocks, num_hit_tokens, shared_prefix_boundary
        num_blocks = schedule.prefix_hit_cap() // schedule.block_size
        trimmed = self.create_kv_cache_blocks(tuple(list(group[:num_blocks]) for group in blocks.blocks))
        return trimmed, num_blocks * schedule.block_size, 0


class GKVFullAttentionManager(EvictionFullAttentionManager):
    """Never hashes a G-KV request's blocks from its first compaction's ``S`` on: some
    event rewrites them, whatever their token hashes say."""

    gkv_schedules: dict[str, GKVSchedule]

    def cache_blocks(self, request: Request, num_tokens: int, retention_interval: int | None = None) -> None:
        schedule = self.gkv_schedules.get(request.request_id)
        if schedule is not None:
            num_tokens = min(num_tokens, schedule.first_kept_slot)
        super().cache_blocks(request, num_tokens, retention_interval=retention_interval)


class GKVSchedulerMixin(EvictionSchedulerMixin):
    """Decode-time events (G-KV's schedule, any decode policy) on top of the one-shot eviction scheduler."""

    def _init_eviction(self, config: EvictionConfig) -> None:
        super()._init_eviction(config)
        self.gkv_policy = config.build_decode_policy()
        assert self.gkv_policy is not None, "GKVSchedulerMixin needs a decode-time policy"
        self.gkv_schedules: dict[str, GKVSchedule] = {}
        # request id -> events scheduled since it (re)started, freed once processed
        self.gkv_events_scheduled: dict[str, set[int]] = {}
        self.kv_cache_manager.__class__ = GKVKVCacheManager
        self.kv_cache_manager.gkv_schedules = self.gkv_schedules
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            manager.__class__ = GKVFullAttentionManager
            manager.gkv_schedules = self.gkv_schedules

    def _plan(self, request: Request) -> None:
        if self.eviction_policy is not None:
            # judgeq+gkv: Judge Q's plan and soft ids first
            super()._plan(request)
        skip = self._skip_reason(request)
        settings = None if skip else self._request_settings(request)
        if skip is None and settings is None:
            skip = "invalid_settings"
        elif skip is None and not settings.enabled:
            skip = "off_by_request"
        elif skip is None and (settings.compress_prefix or settings.budget is not None):
            # a per-request boundary or budget would need per-request schedules: not built
            skip = "per_request_settings_with_gkv"
        if self.eviction_policy is None:
            self.eviction_stats.record_admission(self.eviction_config.policy, skip)
        if skip is not None:
            return
        prefill = self.eviction_plans.get(request.request_id)
        prompt_len = prefill.prompt_len if prefill is not None else request.num_prompt_tokens
        self.gkv_schedules[request.request_id] = gkv_schedule(
            prompt_len, self.gkv_policy, self.eviction_config.budget.tokens, self.block_size, self._num_layers, prefill
        )

    def _demand_row(self, request: Request, num_new_tokens: int, managers: list) -> tuple[int, ...]:
        """The one-shot terms, bounded from the first event on by what a G-KV request can
        hold between events (without it, admission counts every generated token as resident
        and under-admits long generations)."""
        row = super()._demand_row(request, num_new_tokens, managers)
        schedule = self.gkv_schedules.get(request.request_id)
        if schedule is None:
            return row
        return (*row[:-2], schedule.resident_block_cap, schedule.first_event + EVENT_FREE_LAG)

    def _mamba_block_aligned_split(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_local_computed_tokens: int = 0,
        num_external_computed_tokens: int = 0,
    ) -> int:
        num_new_tokens = super()._mamba_block_aligned_split(
            request, num_new_tokens, num_new_local_computed_tokens, num_external_computed_tokens
        )
        schedule = self.gkv_schedules.get(request.request_id)
        if schedule is None:
            return num_new_tokens
        start = request.num_computed_tokens + num_new_local_computed_tokens + num_external_computed_tokens
        return split_at_events(schedule, start, num_new_tokens)

    def _update_after_schedule(self, scheduler_output: SchedulerOutput) -> None:
        jobs: dict[str, GKVJob] = {}
        captures: dict[str, GKVCapture] = {}
        layouts = {}
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            schedule = self.gkv_schedules.get(req_id)
            if schedule is None:
                continue
            request = self.requests[req_id]
            computed = request.num_computed_tokens
            job, capture = step_work(schedule, computed, num_tokens)
            if job is not None:
                jobs[req_id] = job
                self.gkv_events_scheduled.setdefault(req_id, set()).add(job.event)
            # an event past the request's last pass never runs: its window would only wait
            # in the worker for the request's end to be reported
            last_pass_end = min(request.num_prompt_tokens + request.max_tokens, self.max_model_len) - 1
            if capture is not None and capture.event <= last_pass_end:
                captures[req_id] = capture
            layout = schedule.layout_before(computed)
            if layout is not None:
                layouts[req_id] = layout
        super()._update_after_schedule(scheduler_output)
        # the latest event's layout replaces the prefill plan's for the tokens of this step
        scheduler_output.judgeq_compacted.update(layouts)
        scheduler_output.judgeq_gkv_jobs = jobs
        scheduler_output.judgeq_gkv_captures = captures
        # the GPU runner's query ring finds every window from the first event alone
        # (Model Runner V2 receives resumed requests as new ones, so they are here too)
        scheduler_output.judgeq_gkv_first_events = {
            data.req_id: self.gkv_schedules[data.req_id].first_event
            for data in scheduler_output.scheduled_new_reqs
            if data.req_id in self.gkv_schedules
        }

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id, job in getattr(scheduler_output, "judgeq_gkv_jobs", {}).items():
            request = self.requests.get(req_id)
            if request is None or request.is_finished() or job.event not in self.gkv_events_scheduled.get(req_id, ()):
                continue
            pool = self.kv_cache_manager.block_pool
            before = pool.get_num_free_blocks()
            for manager in self.kv_cache_manager.coordinator.single_type_managers:
                # [0, S_i / bs): blocks before S_{i-1} are null already and skipped
                manager._remove_blocks_in_range(req_id, 0, job.target.freed_blocks)
            freed = pool.get_num_free_blocks() - before
            self.eviction_stats.record_decode_compaction(job.source_end - job.source_start - job.target.keep, freed)
            logger.debug("judgeq: request %s G-KV event at %d tokens, %d blocks freed", req_id, job.event, freed)
        return outputs

    def _preempt_request(self, request: Request, timestamp: float) -> None:
        super()._preempt_request(request, timestamp)
        self.gkv_events_scheduled.pop(request.request_id, None)

    def _free_request(self, request: Request, delay_free_blocks: bool = False) -> Any:
        result = super()._free_request(request, delay_free_blocks)
        self.gkv_schedules.pop(request.request_id, None)
        self.gkv_events_scheduled.pop(request.request_id, None)
        return result


class GKVScheduler(GKVSchedulerMixin, Scheduler):
    """vLLM's synchronous scheduler (the CPU platform's) with G-KV."""


class GKVAsyncScheduler(GKVSchedulerMixin, AsyncScheduler):
    """vLLM's asynchronous scheduler (the GPU default) with G-KV. Freeing an event's head
    blocks in ``update_from_output`` is safe although the next step is already scheduled,
    for the reasons of the prefill event (docs/gpu-path-design.md §5)."""
