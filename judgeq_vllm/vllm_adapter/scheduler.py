"""The EngineCore side: soft tokens, chunk boundaries, the plan, and block freeing.

NOTE on the schedule of one evicting request (docs/engine-design.md steps 2 and 5):

1. ``add_request`` makes the plan (deterministic: prompt length, budget, policy, block
   size, and the request's own settings from ``extra_args``, see ``request_settings.py``)
   and, for Judge Q, inserts the soft-token ids ``vocab + j`` after the candidates (the
   prompt's end, or the compression boundary). They exist only here and in the worker:
   the front end keeps its own prompt list, so they are never returned to clients nor
   counted in usage.
2. Chunked prefill is steered through vLLM's per-request chunk hook
   (``_mamba_block_aligned_split``): the chunk that ends the prompt contains the last
   real prompt token and every observation query, and no chunk runs past ``L'``.
3. ``_update_after_schedule`` tags the step whose chunk ends at ``L'`` with a
   compaction job, and every later step of the request with its plan, on the
   ``SchedulerOutput`` (``judgeq_jobs`` / ``judgeq_compacted``).
4. ``update_from_output`` runs after that step has executed, so the head blocks it
   emptied go back to the pool there.

Preemption frees everything and restarts the request from position 0; the same rules
re-run compaction on resume.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

import numpy as np

from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.engine.core import EngineCore
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.request import Request

from .config import EvictionConfig
from .kv_manager import EvictionFullAttentionManager, EvictionKVCacheManager
from .plan import EvictionPlan, plan_request
from .request_settings import RequestSettings, check_request
from .stats import EvictionStats
from .step import EVICTION_SECONDS_ATTR

# a child of vLLM's logger: our lines follow its level (VLLM_LOGGING_LEVEL) and format
logger = init_logger("vllm.judgeq")
# the aggregate counters go to the log at most this often (on a compaction)
STATS_LOG_INTERVAL_S = 10.0
# the admission row's (cap, from length) for a request no decode-time event bounds
UNCAPPED = (1 << 40, 0)


class EvictionSchedulerMixin:
    """Eviction on top of a vLLM scheduler (first base class: its ``__init__`` runs vLLM's, then :meth:`_init_eviction`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = EvictionConfig.from_additional_config(self.vllm_config.additional_config)
        assert config is not None, f"{type(self).__name__} is only installed when eviction is on"
        self._init_eviction(config)

    def _init_eviction(self, config: EvictionConfig) -> None:
        self.eviction_config = config
        self.eviction_policy = config.build_policy()
        self.eviction_stats = EvictionStats()
        self._stats_logged_at = float("-inf")
        # request id -> plan, from add_request until the request is freed
        self.eviction_plans: dict[str, EvictionPlan] = {}
        # requests whose compaction step has been scheduled since they (re)started
        self.compaction_scheduled: set[str] = set()
        model_config = self.vllm_config.model_config
        self._vocab_size = model_config.get_vocab_size()
        self._num_layers = model_config.get_num_layers(self.vllm_config.parallel_config)
        self._install_managers()
        # the chunk hook is vLLM's Mamba alignment split; Mamba state caching itself was
        # decided from has_mamba_layers in __init__ and stays off
        self.need_mamba_block_aligned_split = True

    def _install_managers(self) -> None:
        groups = self.kv_cache_config.kv_cache_groups
        specs = [type(group.kv_cache_spec).__name__ for group in groups]
        if not groups or any(type(group.kv_cache_spec) is not FullAttentionSpec for group in groups):
            raise ValueError(f"--kv-eviction needs full-attention KV-cache groups only, got {specs}")
        assert type(self.kv_cache_manager) is KVCacheManager, type(self.kv_cache_manager)
        self.kv_cache_manager.__class__ = EvictionKVCacheManager
        self.kv_cache_manager.eviction_plans = self.eviction_plans
        self.kv_cache_manager.admission_fits = self._admission_fits
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            assert type(manager) is FullAttentionManager, type(manager)
            manager.__class__ = EvictionFullAttentionManager
            manager.eviction_plans = self.eviction_plans

    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:
            self._plan(request)
        super().add_request(request)

    def _plan(self, request: Request) -> None:
        plan = None
        skip = self._skip_reason(request)
        if skip is None:
            settings = self._request_settings(request)
            if settings is None:
                skip = "invalid_settings"
            elif not settings.enabled:
                skip = "off_by_request"
        if skip is None:
            prompt_len = request.num_prompt_tokens
            candidates = settings.compress_prefix or prompt_len
            plan = plan_request(
                candidates, self.eviction_policy, settings.budget or self.eviction_config.budget, self.block_size,
                self._num_layers, suffix_len=prompt_len - candidates,
            )
            if plan is None:
                skip = "fits_budget"
            elif request.num_prompt_tokens + plan.num_soft + request.max_tokens > self.max_model_len:
                # soft ids count towards vLLM's length: without room the request would stop early
                skip = "no_room_for_soft_tokens"
            elif plan.num_soft and _uses_penalties(request) and not current_platform.is_cpu():
                # Model Runner V2 bins prompt ids into vocab-sized penalty tables on device;
                # a soft id (>= vocab) would land outside its request's row
                skip = "penalties_with_soft_tokens"
        self.eviction_stats.record_admission(self.eviction_config.policy, skip)
        if skip is not None:
            return
        if plan.num_soft:
            self._insert_soft_tokens(request, plan)
        self.eviction_plans[request.request_id] = plan

    def _request_settings(self, request: Request) -> RequestSettings | None:
        """The request's own settings; ``None`` if they are invalid, which the front end
        has already refused (so only a client bypassing it gets here): never raise in
        EngineCore, serve the request without eviction instead."""
        try:
            return check_request(request.sampling_params.extra_args, self.eviction_config.policy, request.num_prompt_tokens)
        except ValueError as error:
            logger.warning("judgeq: request %s served without eviction: %s", request.request_id, error)
            return None

    def _insert_soft_tokens(self, request: Request, plan: EvictionPlan) -> None:
        """Soft ids ``vocab + j`` right after the candidates (the prompt's end, or the
        compression boundary, with the question after them)."""
        soft_ids = [self._vocab_size + j for j in range(plan.num_soft)]
        boundary = plan.prompt_len
        prompt = list(request.prompt_token_ids)
        # replace, never edit: in-process the front end shares this list object, and its
        # copy feeds RequestOutput.prompt_token_ids and usage
        request.prompt_token_ids = prompt[:boundary] + soft_ids + prompt[boundary:]
        # in place: request.all_token_ids is a read-only view of this list
        request._all_token_ids[boundary:boundary] = soft_ids
        request.num_prompt_tokens += plan.num_soft
        # the hashes of the blocks from the boundary on covered the question's ids
        del request.block_hashes[boundary // self.hash_block_size :]
        request.update_block_hashes()
        self.eviction_stats.soft_tokens_appended += plan.num_soft

    @staticmethod
    def _skip_reason(request: Request) -> str | None:
        if request.resumable:
            return "streaming_input"
        if request.prompt_embeds is not None or request.prompt_token_ids is None:
            return "prompt_embeds"
        if request.sampling_params is None:
            return "pooling"
        if request.sampling_params.prompt_logprobs is not None:
            return "prompt_logprobs"
        return None

    def _admission_fits(self, candidate: Request, num_new_tokens: int) -> bool:
        """Whether the running requests and ``candidate`` (after its next ``num_new_tokens``)
        fit the pool for the next ``admission_horizon`` decode steps.

        Each request grows one token per step until its ``max_tokens``, where it ends and
        frees its blocks; an evicting request holds its whole prompt until its compaction
        and only its kept rows after. The demand only drops where a request ends or is
        compacted, so its peak is at one of those steps or at the horizon. A look-ahead,
        not a guarantee: stop strings and EOS end requests earlier (admission is then
        cautious), and growth past the horizon is left to vLLM's preemption.
        """
        horizon = self.eviction_config.admission_horizon
        if horizon == 0:
            return True
        managers = self.kv_cache_manager.coordinator.single_type_managers
        pool = self.kv_cache_manager.block_pool
        rows = [self._demand_row(request, 0, managers) for request in self.running]
        rows.append(self._demand_row(candidate, num_new_tokens, managers))
        start_len, remaining, freed, floor, floor_steps, held, cap, cap_from = (np.array(column) for column in zip(*rows))
        steps = np.unique(np.concatenate([[0, horizon], remaining - 1, floor_steps - 1]))
        steps = steps[(steps >= 0) & (steps <= horizon)]
        length = start_len[:, None] + steps[None, :]
        # vLLM sizes a row by the request's logical length; the freed head is null-blocked
        resident = -(-length // self.block_size) - freed[:, None]
        demand = np.where(steps[None, :] < floor_steps[:, None], np.maximum(resident, floor[:, None]), resident)
        # decode-time eviction bounds what a request holds from its first event on
        demand = np.where(length >= cap_from[:, None], np.minimum(demand, cap[:, None]), demand)
        demand = np.where(steps[None, :] < remaining[:, None], demand, 0)
        capacity = pool.get_num_free_blocks() + int(held.sum())
        return int(demand.sum(axis=0).max()) * len(managers) <= capacity

    def _demand_row(self, request: Request, num_new_tokens: int, managers: list) -> tuple[int, ...]:
        """``request``'s terms for :meth:`_admission_fits`: the slots it fills by the end
        of this step (or of its prefill), steps until it ends, its freed head blocks (0
        without a plan), the blocks it holds until its compaction and for how many steps,
        the blocks it holds now (all groups, less the null blocks compaction left at the
        head of its row), and the most blocks it can hold from a given
        length on (decode-time eviction; here never binding)."""
        computed = request.num_computed_tokens + num_new_tokens
        # the slots it fills this step: its prompt (and, resumed after preemption, its
        # outputs), or, decoding, the token sampled last
        start_len = max(computed, request.num_tokens)
        final_len = min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)
        remaining = max(final_len - start_len, 1)
        plan = self.eviction_plans.get(request.request_id)
        rows = [manager.req_to_blocks.get(request.request_id, ()) for manager in managers]
        # freeing the head null-blocks exactly the plan's head blocks in every group
        head_freed = plan is not None and bool(rows[0]) and rows[0][0].is_null
        # compaction (one-shot or a decode-time event) null-blocks a prefix of the row
        held = sum(len(blocks) - _leading_null_blocks(blocks) for blocks in rows)
        if plan is None:
            return start_len, remaining, 0, 0, 0, held, *UNCAPPED
        if head_freed:
            return start_len, remaining, plan.freed_blocks, 0, 0, held, *UNCAPPED
        # the prompt's blocks stay until the step after the compaction step's output
        # (one more under async scheduling); its chunks take at least this many steps
        prefill_steps = -(-max(plan.total_len - computed, 0) // self.max_num_scheduled_tokens)
        prompt_blocks = -(-plan.total_len // self.block_size)
        return start_len, remaining, plan.freed_blocks, prompt_blocks, prefill_steps + 2, held, *UNCAPPED

    def _mamba_block_aligned_split(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_local_computed_tokens: int = 0,
        num_external_computed_tokens: int = 0,
    ) -> int:
        plan = self.eviction_plans.get(request.request_id)
        if plan is None:
            return num_new_tokens
        start = request.num_computed_tokens + num_new_local_computed_tokens + num_external_computed_tokens
        end = start + num_new_tokens
        if start >= plan.total_len:
            return num_new_tokens
        if end > plan.total_len:
            # compaction runs before any later token: the question after a compression
            # boundary, or the generated tokens prefilled again on resume after preemption
            end = plan.total_len
        elif plan.last_chunk_start < end < plan.total_len:
            # may be 0 (the request waits for a step with enough token budget)
            end = max(plan.last_chunk_start, start)
        return end - start

    def _update_after_schedule(self, scheduler_output: SchedulerOutput) -> None:
        jobs: dict[str, EvictionPlan] = {}
        compacted: dict[str, EvictionPlan] = {}
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            plan = self.eviction_plans.get(req_id)
            if plan is None:
                continue
            if req_id in self.compaction_scheduled:
                compacted[req_id] = plan
            elif self.requests[req_id].num_computed_tokens + num_tokens == plan.total_len:
                jobs[req_id] = plan
        # the worker reads both on every step (plain dataclass attributes, pickled with it)
        scheduler_output.judgeq_jobs = jobs
        scheduler_output.judgeq_compacted = compacted
        self.compaction_scheduled.update(jobs)
        super()._update_after_schedule(scheduler_output)

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        eviction_seconds = getattr(model_runner_output, EVICTION_SECONDS_ATTR, None)
        if eviction_seconds is not None:
            self.eviction_stats.eviction_seconds.observe(eviction_seconds)
        for req_id, plan in scheduler_output.judgeq_jobs.items():
            request = self.requests.get(req_id)
            if request is None or request.is_finished() or req_id not in self.compaction_scheduled:
                continue
            self._free_head_blocks(req_id, plan)
        return outputs

    def _free_head_blocks(self, req_id: str, plan: EvictionPlan) -> None:
        pool = self.kv_cache_manager.block_pool
        before = pool.get_num_free_blocks()
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            manager.free_head_blocks(req_id, plan)
        freed = pool.get_num_free_blocks() - before
        self.eviction_stats.record_compaction(plan, freed)
        logger.debug(
            "judgeq: request %s compacted: prompt %d (+%d soft) -> %d kept per head, %d blocks freed",
            req_id, plan.prompt_len, plan.num_soft, plan.keep, freed,
        )
        now = time.monotonic()
        if now - self._stats_logged_at >= STATS_LOG_INTERVAL_S:
            self._stats_logged_at = now
            logger.info("judgeq eviction counters: %s", self.eviction_stats.summary())

    def eviction_snapshot(self) -> dict:
        """The counters, and the block pool now (what ``judgeq_stats`` returns)."""
        pool = self.kv_cache_manager.block_pool
        # the pool's first block is vLLM's null block, never handed out
        return {**self.eviction_stats.as_dict(), "kv_free_blocks": pool.get_num_free_blocks(), "kv_total_blocks": pool.num_gpu_blocks - 1}

    def _preempt_request(self, request: Request, timestamp: float) -> None:
        super()._preempt_request(request, timestamp)
        self.compaction_scheduled.discard(request.request_id)

    def _free_request(self, request: Request, delay_free_blocks: bool = False) -> Any:
        result = super()._free_request(request, delay_free_blocks)
        self.eviction_plans.pop(request.request_id, None)
        self.compaction_scheduled.discard(request.request_id)
        return result

    def shutdown(self) -> None:
        logger.info("judgeq eviction counters: %s", self.eviction_stats.summary())
        super().shutdown()


def _uses_penalties(request: Request) -> bool:
    params = request.sampling_params
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


class EvictionScheduler(EvictionSchedulerMixin, Scheduler):
    """vLLM's synchronous scheduler (the CPU platform's) with eviction."""


def _engine_core_eviction_stats(engine_core: EngineCore) -> dict:
    return engine_core.scheduler.eviction_snapshot()


class EvictionAsyncScheduler(EvictionSchedulerMixin, AsyncScheduler):
    """vLLM's asynchronous scheduler (the GPU default) with eviction.

    Freeing the head blocks in ``update_from_output`` of the compaction step stays safe
    although the next step is already scheduled: that step touches only blocks from
    ``S / bs`` on, and the freed blocks can be handed out only by a later ``schedule``,
    whose step runs after it on the same stream (docs/gpu-path-design.md §5).
    """


def make_scheduler(*args: Any, **kwargs: Any) -> Scheduler:
    """``scheduler_cls`` factory: picks the scheduler variant for this engine.

    It also gives EngineCore the ``judgeq_stats`` utility, read from the front end with
    ``llm.llm_engine.engine_core.call_utility("judgeq_stats")`` (this runs only in
    engines with eviction on).
    """
    vllm_config = kwargs["vllm_config"]
    EngineCore.judgeq_stats = _engine_core_eviction_stats
    config = EvictionConfig.from_additional_config(vllm_config.additional_config)
    if config is not None and config.decodes:
        from .decode_scheduler import GKVAsyncScheduler, GKVScheduler

        if vllm_config.scheduler_config.async_scheduling:
            return GKVAsyncScheduler(*args, **kwargs)
        return GKVScheduler(*args, **kwargs)
    if vllm_config.scheduler_config.async_scheduling:
        return EvictionAsyncScheduler(*args, **kwargs)
    return EvictionScheduler(*args, **kwargs)


def _leading_null_blocks(blocks) -> int:
    """The null blocks at the head of a request's row (where compaction freed it), by
    bisection: the serving path calls this for every running request on every admission
    attempt, and a long generation's row is mostly null blocks."""
    return bisect.bisect_left(blocks, True, key=lambda block: not block.is_null)
