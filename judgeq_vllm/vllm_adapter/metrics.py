"""Eviction metrics on vLLM's Prometheus ``/metrics`` endpoint.

NOTE on the route. The counters live in the scheduler, in the EngineCore process; the
HTTP server and its Prometheus registry live in the front end. vLLM's own per-step
channel (``SchedulerStats`` inside ``EngineCoreOutputs``) is msgspec-decoded by its
declared fields, so anything added to it is dropped on the way (checked on 0.26.0), and
its only free-form field (``kv_connector_stats``) is read by vLLM's loggers as a KV
connector's. So the front end asks EngineCore instead, through the same ``judgeq_stats``
utility call the tests and the log line use: :class:`EvictionMetricsPoller` refreshes a
snapshot every ``POLL_INTERVAL_S`` on the server's event loop, and
:class:`EvictionCollector`, registered in vLLM's registry, renders the latest snapshot
at scrape time. A scrape therefore lags the engine by at most ``POLL_INTERVAL_S``.

The worker's compaction time reaches the scheduler on each step's ``ModelRunnerOutput``
(``step.EVICTION_SECONDS_ATTR``); the scheduler keeps it as a histogram with the rest.

Exported (labels ``model_name``, ``engine``, as vLLM's own):

| metric | type | what |
|---|---|---|
| ``judgeq:requests_total{policy}`` | counter | admitted requests by the policy planning them (``none``: served without eviction) |
| ``judgeq:requests_skipped_total{reason}`` | counter | requests served without eviction, by reason (``off_by_request``, ``fits_budget``, ...) |
| ``judgeq:compactions_total`` | counter | prompts compacted |
| ``judgeq:tokens_evicted_total`` | counter | prompt tokens evicted per (layer, kv head), summed over requests |
| ``judgeq:blocks_freed_total`` | counter | KV blocks returned to the pool by compaction (prefill and G-KV events) |
| ``judgeq:decode_compactions_total`` | counter | G-KV compactions (its prefill compression included) |
| ``judgeq:decode_rows_evicted_total`` | counter | rows per (layer, kv head) G-KV compactions dropped, summed |
| ``judgeq:compression_ratio`` | histogram | per compaction, the fraction of the candidates' KV removed |
| ``judgeq:eviction_step_seconds`` | histogram | per step that compacted, worker time in scoring and compaction |
| ``judgeq:kv_free_blocks`` / ``judgeq:kv_total_blocks`` | gauge | the block pool (free includes cached-free blocks) |
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from vllm.logger import init_logger
from vllm.utils.async_utils import cancel_task_threadsafe
from vllm.v1.metrics.prometheus import get_prometheus_registry

logger = init_logger("vllm.judgeq")

POLL_INTERVAL_S = 1.0
STATS_UTILITY = "judgeq_stats"


class EvictionCollector(Collector):
    """Renders the latest ``judgeq_stats`` snapshot of one engine as Prometheus metrics."""

    def __init__(self, model_name: str, engine_index: int = 0):
        self.labels = {"model_name": model_name, "engine": str(engine_index)}
        # None until the first poll answers: nothing is exported before that
        self.snapshot: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.snapshot
        if stats is None:
            return
        yield self._by_label("judgeq:requests", "Admitted requests, by the eviction policy planning them.", "policy",
                             stats["requests_by_policy"])
        yield self._by_label("judgeq:requests_skipped", "Requests served without eviction, by reason.", "reason",
                             stats["requests_skipped"])
        yield self._counter("judgeq:compactions", "Prompts compacted.", stats["requests_evicted"])
        yield self._counter("judgeq:tokens_evicted", "Prompt tokens evicted per (layer, kv head), summed.",
                            stats["tokens_evicted"])
        yield self._counter("judgeq:blocks_freed", "KV blocks returned to the pool by compaction.", stats["blocks_freed"])
        yield self._counter("judgeq:decode_compactions", "G-KV compactions.", stats["decode_compactions"])
        yield self._counter("judgeq:decode_rows_evicted", "Rows per (layer, kv head) dropped by G-KV compactions, summed.",
                            stats["decode_rows_evicted"])
        yield self._histogram("judgeq:compression_ratio", "Per compaction, the fraction of the candidates' KV removed.",
                              stats["compression_ratio_histogram"])
        yield self._histogram("judgeq:eviction_step_seconds", "Per step that compacted, worker seconds spent scoring "
                              "and compacting.", stats["eviction_seconds_histogram"])
        yield self._gauge("judgeq:kv_free_blocks", "Free KV blocks (cached-free included).", stats["kv_free_blocks"])
        yield self._gauge("judgeq:kv_total_blocks", "KV blocks of the pool.", stats["kv_total_blocks"])

    def _counter(self, name: str, documentation: str, value: float) -> Metric:
        family = CounterMetricFamily(name, documentation, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def _gauge(self, name: str, documentation: str, value: float) -> Metric:
        family = GaugeMetricFamily(name, documentation, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def _by_label(self, name: str, documentation: str, label: str, values: dict[str, int]) -> Metric:
        family = CounterMetricFamily(name, documentation, labels=[*self.labels, label])
        for key, value in sorted(values.items()):
            family.add_metric([*self.labels.values(), key], value)
        return family

    def _histogram(self, name: str, documentation: str, histogram: dict) -> Metric:
        family = HistogramMetricFamily(name, documentation, labels=list(self.labels))
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, histogram["bounds"]), "+Inf"], histogram["counts"]):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric(list(self.labels.values()), buckets, histogram["sum"])
        return family


class EvictionMetricsPoller:
    """Keeps an :class:`EvictionCollector` fresh from one engine, on the running event loop.

    Registered in vLLM's Prometheus registry by :meth:`start`, removed by :meth:`stop`
    (the engine client's shutdown). Stops by itself if the engine stops answering.
    """

    def __init__(self, engine_core_client: Any, model_name: str):
        self.client = engine_core_client
        self.collector = EvictionCollector(model_name)
        self.registry = get_prometheus_registry()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        try:
            self.registry.register(self.collector)
        except ValueError as error:  # a second engine of this process: its names are taken
            logger.warning("judgeq: eviction metrics not exported for this engine: %s", error)
            return
        self.task = asyncio.get_running_loop().create_task(self._poll(), name="judgeq-metrics")

    def stop(self) -> None:
        """Safe from any thread (vLLM may shut its client down from another one)."""
        if self.task is not None:
            cancel_task_threadsafe(self.task)
            self.task = None
            self.registry.unregister(self.collector)

    async def _poll(self) -> None:
        while True:
            try:
                self.collector.snapshot = await self.client.call_utility_async(STATS_UTILITY)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the engine is gone or failing: vLLM reports that itself
                logger.warning("judgeq: eviction metrics stopped: %s", error)
                return
            await asyncio.sleep(POLL_INTERVAL_S)
