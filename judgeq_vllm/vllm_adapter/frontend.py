"""Front-end hooks: per-request settings refused before EngineCore, and eviction metrics.

Installed by the plugin, once per process, in the process whose ``create_engine_config``
turns eviction on (the front end: the OpenAI server, or the ``LLM`` caller). Each wrapped
method acts only for an engine whose own config has eviction on, so another engine of the
same process (tests) gets vLLM's behaviour unchanged.

- ``InputProcessor.process_inputs``: every request (``LLM`` and the OpenAI server) passes
  here before EngineCore sees it; bad per-request settings raise ``VLLMValidationError``.
- ``AsyncLLM.generate``: the OpenAI server calls it to get a response stream, and only
  iterates it after a streaming response's 200 header is out; checking here, before the
  stream exists, makes a bad setting an HTTP 400 for streaming requests too. It also
  starts the metrics poller on the server's event loop (first request).
- ``AsyncLLM.shutdown``: stops that poller.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from vllm.sampling_params import SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.input_processor import InputProcessor

from .config import CONFIG_KEY, NO_EVICTION
from .metrics import EvictionMetricsPoller
from .request_settings import check_request

_installed = False


def install_front_end_hooks() -> None:
    global _installed
    if _installed:
        return
    InputProcessor.process_inputs = _checking_processed_request(InputProcessor.process_inputs)
    AsyncLLM.generate = _checking_before_streaming(AsyncLLM.generate)
    AsyncLLM.shutdown = _stopping_metrics(AsyncLLM.shutdown)
    _installed = True


def engine_policy(vllm_config: Any) -> str | None:
    """The policy an engine evicts with, or ``None`` (its config was validated at start-up)."""
    name = ((vllm_config.additional_config or {}).get(CONFIG_KEY) or {}).get("kv_eviction")
    return None if name in (None, NO_EVICTION) else name


def _checking_processed_request(process_inputs):
    @functools.wraps(process_inputs)
    def process_inputs_checking_eviction_settings(self: InputProcessor, *args: Any, **kwargs: Any):
        request = process_inputs(self, *args, **kwargs)
        policy = engine_policy(self.vllm_config)
        if policy is not None and request.sampling_params is not None:
            prompt_len = None if request.prompt_token_ids is None else len(request.prompt_token_ids)
            check_request(request.sampling_params.extra_args, policy, prompt_len)
        return request

    return process_inputs_checking_eviction_settings


def _checking_before_streaming(generate):
    # a plain function returning vLLM's async generator: its body runs at the call
    @functools.wraps(generate)
    def generate_checking_eviction_settings(self: AsyncLLM, prompt: Any, sampling_params: Any, *args: Any, **kwargs: Any):
        policy = engine_policy(self.vllm_config)
        if policy is not None:
            if isinstance(sampling_params, SamplingParams):
                check_request(sampling_params.extra_args, policy, _prompt_len(prompt))
            _ensure_metrics_poller(self)
        return generate(self, prompt, sampling_params, *args, **kwargs)

    return generate_checking_eviction_settings


def _stopping_metrics(shutdown):
    @functools.wraps(shutdown)
    def shutdown_stopping_eviction_metrics(self: AsyncLLM, *args: Any, **kwargs: Any):
        poller = self.__dict__.pop("judgeq_metrics", None)
        if poller is not None:
            poller.stop()
        return shutdown(self, *args, **kwargs)

    return shutdown_stopping_eviction_metrics


def _ensure_metrics_poller(engine: AsyncLLM) -> None:
    """Starts the poller on the running event loop (the server's), once per engine."""
    if "judgeq_metrics" not in engine.__dict__ and _event_loop_running():
        poller = engine.judgeq_metrics = EvictionMetricsPoller(
            engine.engine_core, engine.vllm_config.model_config.served_model_name
        )
        poller.start()


def _event_loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # called outside a loop: a later call from the server's loop starts it
        return False
    return True


def _prompt_len(prompt: Any) -> int | None:
    """Tokens of a rendered token prompt (what the OpenAI server passes); ``None`` for
    other prompt forms, whose length ``process_inputs`` checks once it is known."""
    if isinstance(prompt, dict) and prompt.get("prompt_token_ids") is not None:
        return len(prompt["prompt_token_ids"])
    return None
