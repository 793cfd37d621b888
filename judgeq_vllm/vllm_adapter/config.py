"""``EvictionConfig``: the one home of the engine's eviction settings and their checks.

It travels inside ``VllmConfig.additional_config["judgeq"]`` (hashable, reaches the
front end, EngineCore and every worker), is filled from the CLI flags by the plugin or
by :func:`llm_kwargs` for ``LLM(...)``, and is validated once in the front end, before
any engine process starts, so a misconfiguration fails fast with a message naming the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

import torch

from ..policies import (
    POLICIES,
    DecodePolicy,
    EvictionPolicy,
    GKVPolicy,
    KVBudget,
    StreamingLLMDecodePolicy,
    make_policy,
)
from ..soft_tokens import SoftTokens, checkpoint_fingerprint

CONFIG_KEY = "judgeq"
NO_EVICTION = "none"
# policy knobs that have their own CLI flag: flag dest -> policy field
KNOB_FLAGS = {"kv_window": "window", "kv_pool_kernel": "pool_kernel", "kv_sinks": "sinks", "kv_beta": "beta"}
# decode steps that admission looks ahead (EvictionConfig.admission_horizon)
DEFAULT_ADMISSION_HORIZON = 1024


class DecodeSetup(NamedTuple):
    """What a decode-time ``--kv-eviction`` name runs: a prefill policy (``None``: the
    decode policy compresses the prompt itself, as its first event), then the decode policy."""

    prefill: str | None
    decode: type[DecodePolicy]


# decode-time policies (docs/engine-design.md §6): name -> what it runs
DECODE_POLICIES: dict[str, DecodeSetup] = {
    "gkv": DecodeSetup(None, GKVPolicy),
    "judgeq+gkv": DecodeSetup("judgeq", GKVPolicy),
    "streamingllm-decode": DecodeSetup(None, StreamingLLMDecodePolicy),
}
# decode-time policies compress every this many forward passes of a request (G-KV's divide_length)
DEFAULT_DECODE_INTERVAL = 128


def prefill_policy_of(name: str) -> str | None:
    """The policy ``--kv-eviction name`` evicts with at the end of prefill (``None``: a
    decode policy alone, whose prefill compression is its own first event)."""
    setup = DECODE_POLICIES.get(name)
    return name if setup is None else setup.prefill
# stands in for Judge Q's artifact while only the knobs are checked
_PLACEHOLDER_SOFT_TOKENS = SoftTokens(torch.zeros(1, 1), "placeholder", "placeholder")


@dataclass(frozen=True)
class EvictionConfig:
    """Validated eviction settings of one engine.

    Attributes:
        policy: policy name (a key of ``judgeq_vllm.policies.POLICIES``).
        budget: tokens (or ratio) kept per request, per (layer, kv head).
        soft_tokens: path of the Judge Q artifact (``judgeq`` only).
        knobs: the policy's hyperparameters that differ from its defaults.
        admission_horizon: look-ahead of admission, in decode tokens: a waiting request
            is admitted only if the running requests and it, growing one token per step
            for this many steps (each to its ``max_tokens``, freeing its blocks when it
            ends there), never need more blocks than the pool holds. Without it, prompts
            admitted while compacted requests decode push those into preemption, and a
            preempted request pays its whole prompt's prefill and compaction again.
            0 leaves admission to vLLM.
    """

    policy: str
    budget: KVBudget
    soft_tokens: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    admission_horizon: int = DEFAULT_ADMISSION_HORIZON
    decode_interval: int = DEFAULT_DECODE_INTERVAL

    @property
    def prefill_policy(self) -> str | None:
        """The policy that evicts at the end of prefill (:func:`prefill_policy_of`)."""
        return prefill_policy_of(self.policy)

    @property
    def decodes(self) -> bool:
        """Whether the policy evicts during decoding too."""
        return self.policy in DECODE_POLICIES

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "EvictionConfig | None":
        """The config carried by ``additional_config``, or ``None`` when eviction is off.

        Raises:
            ValueError: unknown policy, missing or bad budget, or a knob the policy lacks.
        """
        section = (additional_config or {}).get(CONFIG_KEY) or {}
        name = section.get("kv_eviction")
        if name in (None, NO_EVICTION):
            return None
        if name not in POLICIES and name not in DECODE_POLICIES:
            choices = ", ".join(sorted([*POLICIES, *DECODE_POLICIES]))
            raise ValueError(f"--kv-eviction {name!r} is not a policy; choose one of: none, {choices}")
        if section.get("kv_budget") is None:
            raise ValueError(f"--kv-eviction {name} needs --kv-budget (tokens per head, e.g. 256, or a ratio, e.g. 0.75)")
        config = cls(
            policy=name,
            budget=KVBudget.parse(section["kv_budget"]),
            soft_tokens=section.get("soft_tokens"),
            knobs=dict(section.get("knobs") or {}),
            admission_horizon=_whole_number(
                section.get("kv_admission_horizon"), DEFAULT_ADMISSION_HORIZON, 0, "--kv-admission-horizon", "decode tokens"
            ),
            decode_interval=_whole_number(
                section.get("kv_decode_interval"), DEFAULT_DECODE_INTERVAL, 1, "--kv-decode-interval", "decode steps"
            ),
        )
        config.build_policy(load_soft_tokens=False)  # unknown knobs / bad values fail here
        decode_policy = config.build_decode_policy()
        if decode_policy is not None:
            if config.budget.tokens is None:
                raise ValueError(f"--kv-eviction {name} needs a token budget (e.g. --kv-budget 512), not a ratio")
            decode_policy.check_budget(config.budget.tokens)
        return config

    def to_additional_config(self) -> dict[str, Any]:
        budget = self.budget.tokens if self.budget.tokens is not None else self.budget.ratio
        return {
            "kv_eviction": self.policy, "kv_budget": budget, "soft_tokens": self.soft_tokens, "knobs": dict(self.knobs),
            "kv_admission_horizon": self.admission_horizon, "kv_decode_interval": self.decode_interval,
        }

    def load_soft_tokens(self) -> SoftTokens | None:
        """The Judge Q artifact (``None`` for other policies).

        Raises:
            SoftTokenArtifactError: missing, unreadable, or not an artifact.
            ValueError: ``judgeq`` without an artifact path.
        """
        if self.prefill_policy != "judgeq":
            return None
        if not self.soft_tokens:
            raise ValueError(
                "--kv-eviction judgeq needs --judgeq-soft-tokens PATH: train an artifact with "
                "`judgeq-vllm train`, or use a query-window policy such as `--kv-eviction snapkv`"
            )
        return SoftTokens.load(self.soft_tokens)

    def build_policy(self, load_soft_tokens: bool = True) -> EvictionPolicy | None:
        """The prefill policy object (``None`` for G-KV alone); without ``load_soft_tokens``
        a placeholder artifact stands in for Judge Q's, so knobs can be checked before the
        file is read."""
        if self.prefill_policy is None:
            return None
        knobs = dict(self.knobs)
        if self.prefill_policy == "judgeq":
            knobs["soft_tokens"] = self.load_soft_tokens() if load_soft_tokens else _PLACEHOLDER_SOFT_TOKENS
        return make_policy(self.prefill_policy, **knobs)

    def build_decode_policy(self) -> DecodePolicy | None:
        """The decode-time policy (``None`` for prefill-only policies), compressing every
        ``decode_interval`` passes. Alone (``gkv``, ``streamingllm-decode``) it takes the
        knobs (``--kv-window`` is G-KV's window, ``--kv-sinks`` StreamingLLM's sinks); after
        a prefill policy (``judgeq+gkv``) the knobs are that policy's and it keeps its defaults."""
        if not self.decodes:
            return None
        setup = DECODE_POLICIES[self.policy]
        if setup.prefill is not None:
            return setup.decode(interval=self.decode_interval)
        # the knobs with a flag of their own (the interval has its own flag too)
        names = {f.name for f in dataclasses.fields(setup.decode)} & set(KNOB_FLAGS.values())
        unknown = sorted(set(self.knobs) - names)
        if unknown:
            raise ValueError(
                f"policy {self.policy!r} has no parameter {', '.join(unknown)}; "
                f"its parameters are: {', '.join(sorted(names))}"
            )
        return setup.decode(**self.knobs, interval=self.decode_interval)


def _whole_number(value: Any, default: int, minimum: int, flag: str, unit: str) -> int:
    """``value`` as an int ``>= minimum`` (``default`` for ``None``), else a ValueError naming ``flag``."""
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if number < minimum or str(number) != str(value).strip():
        raise ValueError(f"{flag} must be a whole number of {unit} >= {minimum}, got {value!r}")
    return number


def llm_kwargs(
    kv_eviction: str,
    kv_budget: int | float | str | None = None,
    soft_tokens: str | None = None,
    admission_horizon: int | None = None,
    decode_interval: int | None = None,
    **knobs: Any,
) -> dict[str, Any]:
    """Keyword arguments that turn eviction on for ``vllm.LLM``.

    ``LLM(model, kv_eviction=...)`` cannot work (``EngineArgs`` is a dataclass and rejects
    unknown fields before any plugin loads), so the settings ride in ``additional_config``::

        LLM(model, enforce_eager=True, **llm_kwargs("snapkv", 256, window=16))
    """
    section = {
        "kv_eviction": kv_eviction, "kv_budget": kv_budget, "soft_tokens": soft_tokens, "knobs": knobs,
        "kv_admission_horizon": admission_horizon, "kv_decode_interval": decode_interval,
    }
    return {"additional_config": {CONFIG_KEY: section}}


def validate_engine(config: EvictionConfig, vllm_config: Any) -> None:
    """Start-up checks of the model and the engine features against eviction.

    Raises:
        ValueError: naming what is unsupported and how to fix it.
        SoftTokenArtifactError: Judge Q artifact missing, unreadable, or for another model.
    """
    model_config = vllm_config.model_config
    _check_model(model_config)
    _check_engine_features(vllm_config, config.policy)
    policy = config.build_policy()
    soft = getattr(policy, "soft_tokens", None)
    if soft is not None:
        # dummy weights (throughput benchmarks) have no checkpoint to match: shape only
        if str(vllm_config.load_config.load_format) != "dummy":
            soft.check_model(model_config.model, checkpoint_fingerprint(model_config.model))
        if soft.hidden_size != model_config.get_hidden_size():
            raise ValueError(
                f"soft-token artifact has hidden size {soft.hidden_size}, model {model_config.model!r} "
                f"has {model_config.get_hidden_size()}; train an artifact for this model with `judgeq-vllm train`"
            )
    num_observations = policy.num_observations if policy is not None else 0
    needed = num_observations + 1
    if vllm_config.scheduler_config.max_num_batched_tokens < needed:
        raise ValueError(
            f"--max-num-batched-tokens {vllm_config.scheduler_config.max_num_batched_tokens} is too small for "
            f"{config.policy}: the prefill chunk that ends the prompt holds its {num_observations} "
            f"observation tokens plus the last prompt token; use at least {needed}"
        )


def _check_model(model_config: Any) -> None:
    hf = model_config.hf_text_config
    reasons = []
    if model_config.is_encoder_decoder:
        reasons.append("it is an encoder-decoder model")
    if model_config.is_multimodal_model:
        reasons.append("it is multimodal")
    if model_config.use_mla:
        reasons.append("it uses MLA attention")
    if model_config.is_hybrid or getattr(hf, "attention_chunk_size", None):
        reasons.append("it has non-attention or chunked-attention layers")
    if model_config.get_sliding_window() is not None:
        reasons.append("it uses sliding-window attention")
    layer_types = set(getattr(hf, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        reasons.append(f"its layers are not all full attention ({', '.join(sorted(layer_types))})")
    if reasons:
        raise ValueError(
            f"--kv-eviction needs a decoder-only model whose layers are all full attention "
            f"(Llama, Mistral, Qwen2/3); {model_config.model!r} is refused because {'; '.join(reasons)}. "
            f"Run it with --kv-eviction none"
        )


# the attention backends the GPU path has eviction subclasses for
GPU_ATTENTION_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")


def _check_engine_features(vllm_config: Any, policy: str) -> None:
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    backend = getattr(vllm_config.attention_config, "backend", None)
    parallel = vllm_config.parallel_config
    ranks = parallel.tensor_parallel_size
    kv_heads = vllm_config.model_config.get_total_num_kv_heads() if ranks > 1 else 1
    passes = vllm_config.compilation_config.pass_config if ranks > 1 else None
    unsupported = {
        "speculative decoding": vllm_config.speculative_config is not None,
        "pipeline parallelism": parallel.pipeline_parallel_size > 1,
        # each rank scores and compacts its own kv heads (docs/tensor-parallel-design.md); with
        # more ranks than kv heads vLLM replicates a head, and each copy would be scored by a
        # different share of its query heads
        f"--tensor-parallel-size {ranks} with {kv_heads} KV heads (it must divide them)": kv_heads % ranks != 0,
        # the same code as on CPU, where TP=2 is tested, but no multi-GPU host has run it yet
        "tensor parallelism on GPU (not yet run on a multi-GPU host)": not on_cpu and ranks > 1,
        # compaction steps need the piecewise graphs, which sequence parallelism turns off
        "sequence parallelism or async TP": passes is not None and bool(passes.enable_sp or passes.fuse_gemm_comms),
        "more than one node": parallel.nnodes > 1,
        "decode context parallelism": parallel.decode_context_parallel_size > 1,
        # a prompt's tokens split across ranks: no rank holds all the keys a plan scores
        "prefill context parallelism": parallel.prefill_context_parallel_size > 1,
        "KV-cache connectors": vllm_config.kv_transfer_config is not None,
        "prompt embeddings (--enable-prompt-embeds)": vllm_config.model_config.enable_prompt_embeds,
        "--kv-sharing-fast-prefill": vllm_config.cache_config.kv_sharing_fast_prefill,
        "quantized KV cache (--kv-cache-dtype)": vllm_config.cache_config.cache_dtype not in ("auto", None),
        "data parallelism": parallel.data_parallel_size > 1,
        "compiled execution on CPU (add --enforce-eager)": on_cpu and not vllm_config.model_config.enforce_eager,
        f"the {getattr(backend, 'name', backend)} attention backend (use one of {', '.join(GPU_ATTENTION_BACKENDS)})": (
            not on_cpu and backend is not None and backend.name not in GPU_ATTENTION_BACKENDS
        ),
        "pyramidkv's per-layer budgets with the FLASHINFER attention backend (use FLASH_ATTN or TRITON_ATTN)": (
            not on_cpu and policy == "pyramidkv" and backend is not None and backend.name == "FLASHINFER"
        ),
        "Model Runner V1 on GPU (unset VLLM_USE_V2_MODEL_RUNNER=0)": (
            not on_cpu and not getattr(vllm_config, "use_v2_model_runner", True)
        ),
    }
    refused = [name for name, on in unsupported.items() if on]
    if refused:
        raise ValueError(f"--kv-eviction does not support {', '.join(refused)}; turn it off, or use --kv-eviction none")
