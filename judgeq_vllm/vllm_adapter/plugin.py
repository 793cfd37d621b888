"""The ``vllm.general_plugins`` entry point: flags in, config checked, classes selected.

vLLM calls :func:`register` once in every process it starts (front end, EngineCore,
workers). It only wraps three ``EngineArgs`` methods; every runtime class stays vLLM's
own unless an engine's config asks for eviction, and then the config names our
scheduler and worker (``scheduler_cls`` / ``worker_cls``), so ``--kv-eviction none`` or
no flag leaves vLLM's behaviour unchanged.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from ..policies import POLICIES
from .config import CONFIG_KEY, DECODE_POLICIES, KNOB_FLAGS, NO_EVICTION, EvictionConfig, validate_engine

SCHEDULER_FACTORY = "judgeq_vllm.vllm_adapter.scheduler.make_scheduler"
CPU_WORKER = "judgeq_vllm.vllm_adapter.cpu.worker.EvictionCPUWorker"
VLLM_CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
GPU_WORKER = "judgeq_vllm.vllm_adapter.gpu.worker.EvictionGPUWorker"
VLLM_GPU_WORKER = "vllm.v1.worker.gpu_worker.Worker"

_registered = False


def register() -> None:
    """Wraps ``EngineArgs.add_cli_args``, ``from_cli_args`` and ``create_engine_config``."""
    global _registered
    if _registered:
        return
    from vllm.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args = staticmethod(_with_eviction_flags(EngineArgs.add_cli_args))
    EngineArgs.from_cli_args = classmethod(_folding_eviction_flags(EngineArgs.from_cli_args.__func__))
    EngineArgs.create_engine_config = _selecting_eviction_classes(EngineArgs.create_engine_config)
    _registered = True


def add_eviction_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KV-cache eviction (judgeq-vllm)")
    group.add_argument(
        "--kv-eviction",
        choices=[NO_EVICTION, *sorted(POLICIES), *sorted(DECODE_POLICIES)],
        default=None,
        help="evict prompt KV at the end of prefill with this policy, or also during decoding (gkv, "
        "judgeq+gkv, streamingllm-decode) (default: none)",
    )
    group.add_argument("--kv-budget", default=None, help="KV kept per request and head: tokens (256) or ratio removed (0.75)")
    group.add_argument("--judgeq-soft-tokens", default=None, metavar="PATH", help="Judge Q soft-token artifact")
    group.add_argument("--kv-window", type=int, default=None, help="observation window (snapkv, h2o) / kept tail (judgeq)")
    group.add_argument("--kv-pool-kernel", type=int, default=None, help="max-pool width over token scores (odd)")
    group.add_argument(
        "--kv-sinks", type=int, default=None, help="attention sinks kept by streamingllm, streamingllm-decode"
    )
    group.add_argument("--kv-beta", type=int, default=None, help="pyramidkv bottom/top budget ratio")
    group.add_argument(
        "--kv-decode-interval", default=None, metavar="STEPS",
        help="gkv, streamingllm-decode: compress every this many decode steps (default 128)",
    )
    group.add_argument(
        "--kv-admission-horizon",
        default=None,
        metavar="TOKENS",
        help="admit a request only if the running ones and it fit the pool for this many more decode tokens "
        "each (default 1024; 0: vLLM's admission)",
    )


def _with_eviction_flags(add_cli_args):
    @functools.wraps(add_cli_args)
    def add_cli_args_with_eviction(parser, *args, **kwargs):
        parser = add_cli_args(parser, *args, **kwargs)
        add_eviction_arguments(parser)
        return parser

    return add_cli_args_with_eviction


def eviction_section(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``additional_config["judgeq"]`` section the flags ask for, or ``None``."""
    knobs = {field: getattr(args, flag) for flag, field in KNOB_FLAGS.items() if getattr(args, flag, None) is not None}
    policy = getattr(args, "kv_eviction", None)
    if policy is None:
        given = [
            name for name in ("kv_budget", "judgeq_soft_tokens", "kv_admission_horizon", "kv_decode_interval")
            if getattr(args, name, None) is not None
        ]
        if given or knobs:
            flags = [f"--{name.replace('_', '-')}" for name in given + list(KNOB_FLAGS) if getattr(args, name, None) is not None]
            raise ValueError(f"{', '.join(flags)} given without --kv-eviction POLICY")
        return None
    return {
        "kv_eviction": policy, "kv_budget": args.kv_budget, "soft_tokens": args.judgeq_soft_tokens, "knobs": knobs,
        "kv_admission_horizon": getattr(args, "kv_admission_horizon", None),
        "kv_decode_interval": getattr(args, "kv_decode_interval", None),
    }


def _folding_eviction_flags(from_cli_args):
    @functools.wraps(from_cli_args)
    def from_cli_args_with_eviction(cls, args: argparse.Namespace):
        engine_args = from_cli_args(cls, args)
        section = eviction_section(args)
        if section is not None:
            engine_args.additional_config = {**(engine_args.additional_config or {}), CONFIG_KEY: section}
        return engine_args

    return from_cli_args_with_eviction


def _selecting_eviction_classes(create_engine_config):
    @functools.wraps(create_engine_config)
    def create_engine_config_with_eviction(self, *args, **kwargs):
        vllm_config = create_engine_config(self, *args, **kwargs)
        config = EvictionConfig.from_additional_config(vllm_config.additional_config)
        if config is not None:
            validate_engine(config, vllm_config)
            _select_classes(vllm_config)
            # this is the front-end process: per-request checks and metrics live here
            from .frontend import install_front_end_hooks

            install_front_end_hooks()
        return vllm_config

    return create_engine_config_with_eviction


def _select_classes(vllm_config) -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        vllm_worker, our_worker = VLLM_CPU_WORKER, CPU_WORKER
    elif current_platform.is_cuda():
        vllm_worker, our_worker = VLLM_GPU_WORKER, GPU_WORKER
    else:
        raise ValueError(f"--kv-eviction runs on vLLM's CPU and CUDA platforms, not {current_platform.device_name}")
    scheduler_config, parallel_config = vllm_config.scheduler_config, vllm_config.parallel_config
    if scheduler_config.scheduler_cls not in (None, SCHEDULER_FACTORY):
        raise ValueError(f"--kv-eviction replaces the scheduler; remove --scheduler-cls {scheduler_config.scheduler_cls}")
    if parallel_config.worker_cls not in ("auto", vllm_worker, our_worker):
        raise ValueError(f"--kv-eviction replaces the worker; remove --worker-cls {parallel_config.worker_cls}")
    scheduler_config.scheduler_cls = SCHEDULER_FACTORY
    parallel_config.worker_cls = our_worker
