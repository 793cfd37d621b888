"""One offline throughput run: a fixed batch of token-id prompts through vLLM's ``LLMEngine``.

The engine is driven step by step, as ``LLM.generate`` drives it, so that a stat logger
sees every step's scheduler figures: the peak number of running requests and of KV-cache
use come from the engine itself, in process or not.
"""

from __future__ import annotations

import time
from typing import Any

from vllm import EngineArgs, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.engine.llm_engine import LLMEngine
from vllm.v1.metrics.loggers import StatLoggerBase

from .common import Setting, engine_eviction_stats, eviction_delta, no_eviction, progress, shutdown_llm_engine

WARMUP_PROMPT_LEN = 8


class PeakRecorder(StatLoggerBase):
    """Keeps the peaks of the per-step scheduler stats the front end receives."""

    def __init__(self, vllm_config: Any = None, engine_index: int = 0):
        self.reset()

    def reset(self) -> None:
        self.peak_running = 0
        self.peak_waiting = 0
        self.peak_kv_usage = 0.0
        self.preemptions = 0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.peak_running = max(self.peak_running, scheduler_stats.num_running_reqs)
            self.peak_waiting = max(self.peak_waiting, scheduler_stats.num_waiting_reqs)
            self.peak_kv_usage = max(self.peak_kv_usage, scheduler_stats.kv_cache_usage)
        if iteration_stats is not None:
            self.preemptions += iteration_stats.num_preempted_reqs

    def log_engine_initialized(self) -> None:
        pass


def run_offline(
    engine_kwargs: dict[str, Any], batches: list[Setting], prompts: list[list[int]], output_len: int
) -> list[dict[str, Any]]:
    """Starts one engine and runs every prompt once per batch setting, one batch at a time.

    Each batch generates ``output_len`` tokens (greedy, ``ignore_eos``) for every prompt,
    all submitted at once, with the batch's per-request eviction settings.

    Returns:
        Per batch: wall time, token counts and rates, the engine's peaks, its KV pool in
        blocks, and the eviction counters of that batch alone.
    """
    recorder = PeakRecorder()
    evicting = any(setting.policy is not None for setting in batches)
    start = time.perf_counter()
    engine = LLMEngine.from_engine_args(
        EngineArgs(**engine_kwargs, disable_log_stats=False), stat_loggers=[lambda config, index: recorder]
    )
    startup_s = time.perf_counter() - start
    results = []
    try:
        _generate(engine, [prompts[0][:WARMUP_PROMPT_LEN]], 2, batches[0].request_args(), label=None)
        pool_blocks = engine.vllm_config.cache_config.num_gpu_blocks
        for setting in batches:
            before = engine_eviction_stats(engine) if evicting else no_eviction()
            recorder.reset()
            start = time.perf_counter()
            outputs = _generate(engine, prompts, output_len, setting.request_args(), label=setting.label)
            wall_s = time.perf_counter() - start
            eviction = eviction_delta(before, engine_eviction_stats(engine)) if evicting else no_eviction()
            result = _batch_result(outputs, wall_s, recorder, eviction)
            results.append(result | {"startup_s": round(startup_s, 2), "pool_blocks": pool_blocks})
    finally:
        shutdown_llm_engine(engine)
    return results


def _batch_result(outputs: list, wall_s: float, recorder: PeakRecorder, eviction: dict[str, Any]) -> dict[str, Any]:
    output_tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
    return {
        "wall_s": round(wall_s, 3),
        "requests": len(outputs),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / wall_s,
        "total_tok_s": (prompt_tokens + output_tokens) / wall_s,
        "peak_running_requests": recorder.peak_running,
        "peak_waiting_requests": recorder.peak_waiting,
        "peak_kv_usage": round(recorder.peak_kv_usage, 4),
        "preemptions": recorder.preemptions,
        "eviction": eviction,
    }


def _generate(engine: LLMEngine, prompts: list[list[int]], output_len: int, extra_args: dict | None, label: str | None) -> list:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, extra_args=extra_args)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"{label or 'warmup'}-{index}", TokensPrompt(prompt_token_ids=prompt), params)
    finished = []
    with progress(total=len(prompts), desc=f"offline {label}", unit="req", disable=label is None) as bar:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished.append(output)
                    bar.update(1)
    return finished
