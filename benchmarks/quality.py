"""What the quality benchmarks (RULER, needle in a haystack) share: prompts, the two
protocols, engines per policy, greedy generation with the engine's eviction counters.

A sample is a dict with ``context``, ``question``, ``answer_prefix``, ``outputs`` (the
references) and ``max_new_tokens`` (RULER's layout, ``judgeq_vllm.assets.ruler``). It
becomes one user turn of the model's chat template, ``context + question``, with the
answer prefix opening the assistant turn.

Settings: full KV is vanilla vLLM (an engine without the plugin). Each policy gets one
engine; every request names its own budget, so one engine serves all the budgets of its
policy, and both protocols.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path
from typing import Any, Callable

from .common import (
    BLOCK_SIZE,
    N_SOFT,
    Setting,
    engine_eviction_stats,
    eviction_delta,
    no_eviction,
    shutdown_llm_engine,
)

PROTOCOLS = ("query_aware", "query_agnostic")
# the protocol label of vanilla vLLM's cell: nothing is evicted, both protocols coincide
FULL_KV = "full"


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """A sample's prompt as token ids; ``ids[:context_len]`` is everything up to the end
    of the context (chat-template head included), the rest the question and answer prefix."""

    ids: list[int]
    context_len: int


def chat_prompt(tokenizer, sample: dict[str, Any]) -> ChatPrompt:
    """The sample in the model's chat template, split where the context ends.

    Both halves are tokenized separately, so the split is a token boundary (the ids may
    differ from tokenizing the whole text at that one seam; every setting and protocol
    gets the same ids).
    """
    messages = [{"role": "user", "content": sample["context"] + sample["question"]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + sample["answer_prefix"]
    start = text.find(sample["context"])
    if start < 0:
        raise ValueError("the chat template changed the context; cannot find where it ends")
    context_end = start + len(sample["context"])
    head = tokenizer.encode(text[:context_end], add_special_tokens=False)
    rest = tokenizer.encode(text[context_end:], add_special_tokens=False)
    return ChatPrompt(head + rest, len(head))


def template_overhead(tokenizer) -> int:
    """Tokens the chat template adds around a user turn and before the answer."""
    sample = {"context": "x", "question": "", "answer_prefix": ""}
    return len(chat_prompt(tokenizer, sample).ids) - len(tokenizer.encode("x", add_special_tokens=False))


def engine_request(prompt: ChatPrompt, setting: Setting, protocol: str, max_new_tokens: int):
    """The engine request of one sample under one protocol (greedy decoding).

    PROTOCOLS. ``query_aware``: the whole prompt (context, question, answer prefix) is
    prefilled and then evicted, so the policy scores with the question in view.
    ``query_agnostic`` (kvpress's leaderboard protocol): the context is compressed
    before the question is seen: the request sets the compression boundary
    ``kv_compress_prefix`` to the context's length, so only the context's KV is evicted,
    Judge Q's soft tokens (or SnapKV's window) sit right after the context, and the
    question and answer prefix are prefilled after the compaction, with nothing of
    theirs evicted. For vanilla (full KV) the two protocols are the same request.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    compress_prefix = prompt.context_len if protocol == "query_agnostic" else None
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, extra_args=setting.request_args(compress_prefix))
    return TokensPrompt(prompt_token_ids=prompt.ids), params


@dataclasses.dataclass(frozen=True)
class QualityEngine:
    """How the quality benchmarks start engines (one per policy, plus vanilla)."""

    model_dir: Path
    dtype: str
    max_model_len: int
    soft_tokens: Path | None
    enforce_eager: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_memory_bytes: int | None
    extra_engine_args: dict[str, Any]

    def kwargs(self, engine_setting: Setting) -> dict[str, Any]:
        kwargs = dict(
            model=str(self.model_dir), dtype=self.dtype, seed=0, block_size=BLOCK_SIZE, max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            # no request may reuse another's KV: every cell is measured on its own
            enable_prefix_caching=False,
        )
        if self.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        if self.enforce_eager:
            kwargs["enforce_eager"] = True
        return kwargs | self.extra_engine_args | engine_setting.eviction_kwargs(self.soft_tokens)

    def describe(self) -> dict[str, Any]:
        return self.kwargs(Setting()) | {"soft_tokens": str(self.soft_tokens) if self.soft_tokens else None}


Cell = tuple[Setting, str]  # a setting under a protocol


def engine_cells(policy: str | None, budgets: list, protocols: list[str]) -> list[Cell]:
    """What one engine evaluates: vanilla once (without eviction the protocols are the
    same request), a policy at every budget under every protocol."""
    if policy is None:
        return [(Setting(), FULL_KV)]
    return [(Setting(policy, budget), protocol) for budget in budgets for protocol in protocols]


def run_engine(
    engine: QualityEngine, policy: str | None, budgets: list, protocols: list[str],
    groups: dict[Any, tuple[list[ChatPrompt], list[dict]]], score: Callable[[dict, str], float], progress_bar,
) -> list[dict[str, Any]]:
    """Starts the engine of ``policy`` (``None``: vanilla) and evaluates each group of
    samples (e.g. one per length) in each of its cells, one batched ``generate`` call per
    cell and group.

    Returns:
        Per cell and group: the setting, the protocol, the group's key, every prediction
        and score (in sample order), and the engine's eviction counters for that call.
    """
    from vllm import LLM

    cells = engine_cells(policy, budgets, protocols)
    llm = LLM(**engine.kwargs(cells[0][0]))
    results = []
    try:
        for setting, protocol in cells:
            for key, (prompts, samples) in groups.items():
                predictions, eviction = _generate_cell(llm, setting, protocol, prompts, samples)
                results.append({
                    **setting.as_dict(), "protocol": protocol, "group": key,
                    "eviction": eviction | {"requests": len(samples)}, "predictions": predictions,
                    "scores": [score(sample, prediction) for sample, prediction in zip(samples, predictions, strict=True)],
                })
                progress_bar.update(1)
    finally:
        shutdown_llm_engine(llm.llm_engine)
    return results


def _generate_cell(
    llm, setting: Setting, protocol: str, prompts: list[ChatPrompt], samples: list[dict]
) -> tuple[list[str], dict]:
    request_protocol = "query_aware" if protocol == FULL_KV else protocol
    requests = [engine_request(prompt, setting, request_protocol, sample["max_new_tokens"])
                for prompt, sample in zip(prompts, samples, strict=True)]
    evicting = setting.policy is not None
    before = engine_eviction_stats(llm.llm_engine) if evicting else no_eviction()
    outputs = llm.generate([prompt for prompt, _ in requests], [params for _, params in requests], use_tqdm=False)
    eviction = eviction_delta(before, engine_eviction_stats(llm.llm_engine)) if evicting else no_eviction()
    return [output.outputs[0].text for output in outputs], eviction


def check_fits(prompts: list[ChatPrompt], samples: list[dict], max_model_len: int) -> None:
    """Every prompt, its soft tokens and its answer fit the engine's length (else the
    engine would skip eviction for it, silently)."""
    for prompt, sample in zip(prompts, samples, strict=True):
        needed = len(prompt.ids) + N_SOFT + sample["max_new_tokens"]
        if needed > max_model_len:
            raise ValueError(
                f"a {sample.get('task', 'needle')} prompt needs {needed} positions (prompt {len(prompt.ids)}, "
                f"{N_SOFT} soft tokens, {sample['max_new_tokens']} new) but the engine has {max_model_len}"
            )


def load_or_build_samples(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Samples from ``path`` (gzipped JSON) if it exists, else built and written there.

    The GPU host has neither RULER's generators nor the essays: samples are prepared on
    a machine with the assets and carried over as this one file.
    """
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return json.load(handle)
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    # written aside, then renamed: an interrupted run never leaves a truncated file behind,
    # and two runs preparing the same file at once never write into one another's
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with gzip.open(partial, "wt", encoding="utf-8") as handle:
        json.dump(data, handle)
    partial.replace(path)
    return data
