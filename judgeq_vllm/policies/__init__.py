"""Eviction policies, pure torch: one small class per method, and a name registry."""

from __future__ import annotations

import dataclasses

from .base import EvictionPolicy, ObservationSource, ScoreInputs, observation_attention, select_keep
from .budget import KVBudget
from .gkv import GKVCompression, GKVPolicy
from .h2o import H2OPolicy
from .judgeq import JudgeQPolicy
from .knorm import KnormPolicy
from .pyramidkv import PyramidKVPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingLLMPolicy

# the prefill policies (one eviction at the end of prefill); G-KV, which compresses again
# during decoding, has its own interface (GKVPolicy.compress)
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
    "EvictionPolicy",
    "GKVCompression",
    "GKVPolicy",
    "H2OPolicy",
    "JudgeQPolicy",
    "KVBudget",
    "KnormPolicy",
    "ObservationSource",
    "PyramidKVPolicy",
    "ScoreInputs",
    "SnapKVPolicy",
    "StreamingLLMPolicy",
    "make_policy",
    "observation_attention",
    "select_keep",
]
