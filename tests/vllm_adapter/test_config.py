"""Flags, config and start-up errors: real vLLM config objects, no engine started."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from judgeq_vllm.soft_tokens import SoftTokenArtifactError, SoftTokens
from judgeq_vllm.vllm_adapter import llm_kwargs
from judgeq_vllm.vllm_adapter.config import EvictionConfig
from judgeq_vllm.vllm_adapter.plugin import (
    CPU_WORKER,
    GPU_WORKER,
    SCHEDULER_FACTORY,
    VLLM_CPU_WORKER,
    VLLM_GPU_WORKER,
    _select_classes,
)


def parse_cli(argv):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="test"))  # loads the general plugins first
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))


def engine_config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    base = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, block_size=16)
    return EngineArgs(**{**base, **kwargs}).create_engine_config()


def test_flags_reach_additional_config(smollm2_dir):
    args = parse_cli(["--model", smollm2_dir, "--kv-eviction", "snapkv", "--kv-budget", "256", "--kv-window", "16",
                      "--kv-pool-kernel", "5", "--kv-admission-horizon", "300", "--additional-config", json.dumps({"other": 1})])
    assert args.additional_config == {
        "other": 1,
        "judgeq": {
            "kv_eviction": "snapkv", "kv_budget": "256", "soft_tokens": None, "knobs": {"window": 16, "pool_kernel": 5},
            "kv_admission_horizon": "300", "kv_decode_interval": None,
        },
    }
    config = EvictionConfig.from_additional_config(args.additional_config)
    assert config.policy == "snapkv" and config.budget.tokens == 256 and config.knobs == {"window": 16, "pool_kernel": 5}
    assert config.admission_horizon == 300
    assert EvictionConfig.from_additional_config(llm_kwargs("snapkv", 64)["additional_config"]).admission_horizon == 1024


def test_no_flag_leaves_engine_args_alone(smollm2_dir):
    assert parse_cli(["--model", smollm2_dir]).additional_config == {}
    with pytest.raises(ValueError, match="--kv-budget given without --kv-eviction"):
        parse_cli(["--model", smollm2_dir, "--kv-budget", "64"])
    with pytest.raises(SystemExit):
        parse_cli(["--model", smollm2_dir, "--kv-eviction", "bogus"])


@pytest.mark.parametrize("policy", [None, "none"])
def test_no_eviction_keeps_vllm_classes(smollm2_dir, policy):
    extra = {} if policy is None else llm_kwargs(policy)
    config = engine_config(smollm2_dir, **extra)
    assert config.scheduler_config.scheduler_cls is None
    assert config.parallel_config.worker_cls == VLLM_CPU_WORKER


def test_eviction_selects_our_classes(smollm2_dir):
    config = engine_config(smollm2_dir, **llm_kwargs("knorm", 0.5))
    assert config.scheduler_config.scheduler_cls == SCHEDULER_FACTORY
    assert config.parallel_config.worker_cls == CPU_WORKER


@pytest.mark.parametrize(
    "section, message",
    [
        ({"kv_eviction": "bogus", "kv_budget": 64}, "'bogus' is not a policy; choose one of: none, gkv, h2o, judgeq, judgeq\\+gkv"),
        ({"kv_eviction": "snapkv", "kv_budget": 0}, "positive token count"),
        ({"kv_eviction": "snapkv", "kv_budget": -5}, "positive token count"),
        ({"kv_eviction": "snapkv", "kv_budget": 1.5}, r"ratio must be in \[0, 1\)"),
        ({"kv_eviction": "snapkv"}, "needs --kv-budget"),
        ({"kv_eviction": "snapkv", "kv_budget": 64, "kv_admission_horizon": -1}, "--kv-admission-horizon must be a whole number"),
        ({"kv_eviction": "snapkv", "kv_budget": 64, "kv_admission_horizon": "lots"}, "--kv-admission-horizon must be a whole number"),
        ({"kv_eviction": "snapkv", "kv_budget": 64, "knobs": {"sinks": 4}}, "policy 'snapkv' has no parameter sinks"),
    ],
)
def test_bad_settings_name_the_fix(section, message):
    with pytest.raises(ValueError, match=message):
        EvictionConfig.from_additional_config({"judgeq": section})


def test_judgeq_without_artifact_suggests_training_or_snapkv(smollm2_dir):
    with pytest.raises(ValueError, match="needs --judgeq-soft-tokens PATH: train an artifact .* `--kv-eviction snapkv`"):
        engine_config(smollm2_dir, **llm_kwargs("judgeq", 64))


def test_missing_artifact(smollm2_dir, tmp_path):
    with pytest.raises(SoftTokenArtifactError, match="does not exist; train one"):
        engine_config(smollm2_dir, **llm_kwargs("judgeq", 64, soft_tokens=str(tmp_path / "none.safetensors")))


def test_artifact_for_another_model(smollm2_dir, tmp_path):
    path = tmp_path / "other.safetensors"
    SoftTokens(torch.zeros(4, 576), "OtherModel", "0" * 64).save(path)
    with pytest.raises(SoftTokenArtifactError, match="trained for model 'OtherModel'"):
        engine_config(smollm2_dir, **llm_kwargs("judgeq", 64, soft_tokens=str(path)))


def test_matching_artifact_is_accepted(smollm2_dir, soft_tokens, tmp_path):
    path = tmp_path / "soft.safetensors"
    soft_tokens.save(path)
    config = engine_config(smollm2_dir, **llm_kwargs("judgeq", 64, soft_tokens=str(path)))
    assert config.scheduler_config.scheduler_cls == SCHEDULER_FACTORY


def test_unsupported_engine_features_are_refused(smollm2_dir):
    with pytest.raises(ValueError, match=r"compiled execution on CPU \(add --enforce-eager\)"):
        engine_config(smollm2_dir, enforce_eager=False, **llm_kwargs("snapkv", 64))
    with pytest.raises(ValueError, match="--max-num-batched-tokens 16 is too small for snapkv.*use at least 33"):
        engine_config(smollm2_dir, max_num_batched_tokens=16, max_num_seqs=4, **llm_kwargs("snapkv", 64))


def test_sliding_window_model_is_refused(smollm2_dir, tmp_path):
    """A Mistral-style sliding window on the same checkpoint: refused, naming the reason."""
    for name in os.listdir(smollm2_dir):
        os.symlink(os.path.join(smollm2_dir, name), tmp_path / name)
    config = json.loads(open(os.path.join(smollm2_dir, "config.json")).read())
    os.remove(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 256}))
    with pytest.raises(ValueError, match="refused because it uses sliding-window attention"):
        engine_config(str(tmp_path), **llm_kwargs("snapkv", 64))


class _Platform:
    def __init__(self, kind):
        self.kind, self.device_name = kind, kind

    def is_cpu(self):
        return self.kind == "cpu"

    def is_cuda(self):
        return self.kind == "cuda"


@pytest.mark.parametrize(
    "kind, vllm_worker, ours",
    [("cpu", VLLM_CPU_WORKER, CPU_WORKER), ("cuda", VLLM_GPU_WORKER, GPU_WORKER), ("cuda", "auto", GPU_WORKER)],
)
def test_workers_selected_per_platform(monkeypatch, kind, vllm_worker, ours):
    import vllm.platforms

    monkeypatch.setattr(vllm.platforms, "current_platform", _Platform(kind))
    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(scheduler_cls=None), parallel_config=SimpleNamespace(worker_cls=vllm_worker)
    )
    _select_classes(config)
    assert config.parallel_config.worker_cls == ours
    assert config.scheduler_config.scheduler_cls == SCHEDULER_FACTORY


def test_other_platforms_and_foreign_workers_are_refused(monkeypatch):
    import vllm.platforms

    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(scheduler_cls=None), parallel_config=SimpleNamespace(worker_cls="my.Worker")
    )
    monkeypatch.setattr(vllm.platforms, "current_platform", _Platform("cuda"))
    with pytest.raises(ValueError, match="replaces the worker; remove --worker-cls my.Worker"):
        _select_classes(config)
    monkeypatch.setattr(vllm.platforms, "current_platform", _Platform("xpu"))
    with pytest.raises(ValueError, match="CPU and CUDA platforms, not xpu"):
        _select_classes(config)


def gpu_engine_features(backend):
    """A CUDA engine config with every feature off, as ``_check_engine_features`` reads it."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return SimpleNamespace(
        attention_config=SimpleNamespace(backend=None if backend is None else AttentionBackendEnum[backend]),
        speculative_config=None,
        kv_transfer_config=None,
        parallel_config=SimpleNamespace(
            pipeline_parallel_size=1, tensor_parallel_size=1, decode_context_parallel_size=1, data_parallel_size=1,
            prefill_context_parallel_size=1, nnodes=1,
        ),
        model_config=SimpleNamespace(enable_prompt_embeds=False, enforce_eager=False,
                                     get_total_num_kv_heads=lambda: 8),
        compilation_config=SimpleNamespace(pass_config=SimpleNamespace(enable_sp=False, fuse_gemm_comms=False)),
        cache_config=SimpleNamespace(kv_sharing_fast_prefill=False, cache_dtype="auto"),
        use_v2_model_runner=True,
    )


@pytest.mark.parametrize("backend", [None, "FLASH_ATTN", "TRITON_ATTN"])
def test_pyramidkv_is_accepted_on_gpu(monkeypatch, backend):
    import vllm.platforms

    from judgeq_vllm.vllm_adapter.config import _check_engine_features

    monkeypatch.setattr(vllm.platforms, "current_platform", _Platform("cuda"))
    _check_engine_features(gpu_engine_features(backend), "pyramidkv")


def test_pyramidkv_with_flashinfer_is_refused_on_gpu(monkeypatch):
    import vllm.platforms

    from judgeq_vllm.vllm_adapter.config import _check_engine_features

    monkeypatch.setattr(vllm.platforms, "current_platform", _Platform("cuda"))
    _check_engine_features(gpu_engine_features("FLASHINFER"), "snapkv")
    with pytest.raises(ValueError, match="pyramidkv's per-layer budgets with the FLASHINFER attention backend"):
        _check_engine_features(gpu_engine_features("FLASHINFER"), "pyramidkv")


@pytest.mark.parametrize(
    "field, name",
    [("tensor_parallel_size", "tensor parallelism on GPU"), ("pipeline_parallel_size", "pipeline parallelism"),
     ("prefill_context_parallel_size", "prefill context parallelism"),
     ("decode_context_parallel_size", "decode context parallelism"), ("data_parallel_size", "data parallelism")],
)
def test_parallelism_is_refused_by_name(monkeypatch, field, name):
    import vllm.platforms

    from judgeq_vllm.vllm_adapter.config import _check_engine_features

    monkeypatch.setattr(vllm.platforms, "current_platform", _Platform("cuda"))
    config = gpu_engine_features("FLASH_ATTN")
    setattr(config.parallel_config, field, 2)
    with pytest.raises(ValueError, match=f"--kv-eviction does not support {name}"):
        _check_engine_features(config, "snapkv")


def cpu_engine_features(ranks, kv_heads):
    config = gpu_engine_features(None)
    config.parallel_config.tensor_parallel_size = ranks
    config.model_config.get_total_num_kv_heads = lambda: kv_heads
    config.model_config.enforce_eager = True
    return config


@pytest.mark.parametrize("ranks, kv_heads", [(2, 4), (4, 4), (2, 8)])
def test_tensor_parallelism_dividing_the_kv_heads_is_accepted_on_cpu(monkeypatch, ranks, kv_heads):
    import vllm.platforms

    from judgeq_vllm.vllm_adapter.config import _check_engine_features

    monkeypatch.setattr(vllm.platforms, "current_platform", _Platform("cpu"))
    _check_engine_features(cpu_engine_features(ranks, kv_heads), "judgeq")


@pytest.mark.parametrize("ranks, kv_heads", [(2, 3), (8, 4), (3, 4)])
def test_tensor_parallelism_not_dividing_the_kv_heads_is_refused(monkeypatch, ranks, kv_heads):
    import vllm.platforms

    from judgeq_vllm.vllm_adapter.config import _check_engine_features

    monkeypatch.setattr(vllm.platforms, "current_platform", _Platform("cpu"))
    with pytest.raises(ValueError, match=f"--tensor-parallel-size {ranks} with {kv_heads} KV heads"):
        _check_engine_features(cpu_engine_features(ranks, kv_heads), "snapkv")


@pytest.mark.parametrize("field", ["enable_sp", "fuse_gemm_comms"])
def test_sequence_parallelism_is_refused_with_tensor_parallelism(monkeypatch, field):
    import vllm.platforms

    from judgeq_vllm.vllm_adapter.config import _check_engine_features

    monkeypatch.setattr(vllm.platforms, "current_platform", _Platform("cpu"))
    config = cpu_engine_features(2, 4)
    setattr(config.compilation_config.pass_config, field, True)
    with pytest.raises(ValueError, match="sequence parallelism or async TP"):
        _check_engine_features(config, "snapkv")


def test_more_than_one_node_is_refused(monkeypatch):
    import vllm.platforms

    from judgeq_vllm.vllm_adapter.config import _check_engine_features

    monkeypatch.setattr(vllm.platforms, "current_platform", _Platform("cpu"))
    config = cpu_engine_features(2, 4)
    config.parallel_config.nnodes = 2
    with pytest.raises(ValueError, match="more than one node"):
        _check_engine_features(config, "snapkv")


@pytest.mark.parametrize("backend", [None, "FLASH_ATTN", "TRITON_ATTN", "FLASHINFER"])
@pytest.mark.parametrize("policy", ["gkv", "judgeq+gkv", "streamingllm-decode"])
def test_decode_time_eviction_is_accepted_on_gpu(monkeypatch, backend, policy):
    import vllm.platforms

    from judgeq_vllm.vllm_adapter.config import _check_engine_features

    monkeypatch.setattr(vllm.platforms, "current_platform", _Platform("cuda"))
    _check_engine_features(gpu_engine_features(backend), policy)
