"""Eviction policies, pure torch: one small class per method, and a name registry."""

from __future__ import annotations

import dataclasses

from .base import EvictionPolicy, ObservationSource, ScoreInputs, observation_attention, select_keep
from .budget import KVBudget
from .decode import DecodeCompression, DecodePolicy
from .gkv import GKVPolicy
from .h2o import H2OPolicy
from .judgeq import JudgeQPolicy
from .knorm import KnormPolicy
from .pyramidkv import PyramidKVPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingLLMDecodePolicy, StreamingLLMPolicy

# the prefill policies (one eviction at the end of prefill); the decode-time ones (G-KV,
# StreamingLLM's decode variant), which compress again during decoding, have their own
# interface (DecodePolicy) and are named in vllm_adapter.config.DECODE_POLICIES
POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (JudgeQPolicy, SnapKVPolicy, StreamingLLMPolicy, H2OPolicy, KnormPolicy, PyramidKVPolicy)
}


def make_policy(name: str, **knobs) -> EvictionPolicy:
    """Builds the policy called ``name`` with its hyperparameters.

    Raises:
        ValueError: unknown policy name, or a knob the policy does not have.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(knobs) - fields)
    if unknown:
        raise ValueError(
            f"policy {name!r} has no parameter {', '.join(unknown)}; its parameters are: {', '.join(sorted(fields))}"
        )
    return cls(**knobs)


__all__ = [
    "POLICIES",
    "DecodeCompression",
    "DecodePolicy",
    "EvictionPolicy",
    "GKVPolicy",
    "H2OPolicy",
    "JudgeQPolicy",
    "KVBudget",
    "KnormPolicy",
    "ObservationSource",
    "PyramidKVPolicy",
    "ScoreInputs",
    "SnapKVPolicy",
    "StreamingLLMDecodePolicy",
    "StreamingLLMPolicy",
    "make_policy",
    "observation_attention",
    "select_keep",
]
