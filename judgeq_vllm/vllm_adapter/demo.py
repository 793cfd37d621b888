"""The engine half of ``make demo``: one long prompt through vLLM, once per policy.

Each policy gets its own in-process engine (eviction is a per-engine setting); the
report says what the request kept and how many KV blocks went back to the pool, as the
engine's own counters measured them.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .config import llm_kwargs

BLOCK_SIZE = 16


@dataclass(frozen=True)
class EngineDemoRow:
    """What one engine run did with the demo prompt.

    Attributes:
        policy: ``"none"`` for the full-KV baseline, else the policy name.
        prompt_tokens: the user's prompt length.
        kept_per_head: prompt rows left per (layer, kv head) after prefill.
        blocks_freed: KV blocks returned to the pool by compaction (block pool counter).
        freed_mib: ``blocks_freed`` in MiB of KV cache.
        answer: the greedy answer, decoded.
        seconds: engine start excluded.
    """

    policy: str
    prompt_tokens: int
    kept_per_head: int
    blocks_freed: int
    freed_mib: float
    answer: str
    seconds: float


def run_engine_demo(
    model_dir: str,
    prompt_ids: Sequence[int],
    policies: Sequence[str],
    budget: int | float | str,
    soft_tokens: str | None = None,
    max_new_tokens: int = 24,
    print_fn: Callable[[str], None] | None = print,
) -> list[EngineDemoRow]:
    """Serves ``prompt_ids`` with vLLM, full KV first, then with each policy.

    Args:
        model_dir: HF folder of the model (the embedded SmolLM2-135M-Instruct).
        prompt_ids: the prompt's token ids.
        policies: eviction policy names (``judgeq`` needs ``soft_tokens``).
        budget: ``--kv-budget``: tokens per head or a ratio.
        soft_tokens: Judge Q artifact path.
        max_new_tokens: answer length limit.
        print_fn: where the table goes (``None``: nowhere).
    """
    # EngineCore in this process, so its counters and pool are one call away
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    rows = [_run_one(model_dir, prompt_ids, None, budget, soft_tokens, max_new_tokens)]
    rows += [_run_one(model_dir, prompt_ids, name, budget, soft_tokens, max_new_tokens) for name in policies]
    if print_fn is not None:
        print_fn(format_rows(rows))
    return rows


def _run_one(model_dir, prompt_ids, policy, budget, soft_tokens, max_new_tokens) -> EngineDemoRow:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    eviction = llm_kwargs(policy, budget, soft_tokens=soft_tokens if policy == "judgeq" else None) if policy else {}
    llm = LLM(
        model=model_dir, dtype="float32", enforce_eager=True, block_size=BLOCK_SIZE, seed=0,
        max_model_len=len(prompt_ids) + max_new_tokens + 64, kv_cache_memory_bytes=256 * 2**20, **eviction,
    )
    try:
        start = time.monotonic()
        output = llm.generate(
            [TokensPrompt(prompt_token_ids=list(prompt_ids))],
            SamplingParams(max_tokens=max_new_tokens, temperature=0.0),
            use_tqdm=False,
        )[0]
        seconds = time.monotonic() - start
        core = llm.llm_engine.engine_core.engine_core
        stats = core.judgeq_stats() if policy else None
        bytes_per_block = _kv_bytes_per_block(core)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    tokens_evicted = stats["tokens_evicted"] if stats else 0
    blocks_freed = stats["blocks_freed"] if stats else 0
    return EngineDemoRow(
        policy=policy or "none",
        prompt_tokens=len(prompt_ids),
        kept_per_head=len(prompt_ids) - tokens_evicted,
        blocks_freed=blocks_freed,
        freed_mib=blocks_freed * bytes_per_block / 2**20,
        answer=output.outputs[0].text.strip().replace("\n", " "),
        seconds=seconds,
    )


def _kv_bytes_per_block(core) -> int:
    config = core.scheduler.kv_cache_config
    return sum(tensor.size for tensor in config.kv_cache_tensors) // config.num_blocks


def format_rows(rows: Sequence[EngineDemoRow]) -> str:
    lines = [f"{'policy':<14} {'prompt':>6} {'kept/head':>9} {'blocks freed':>12} {'MiB freed':>9} {'s':>5}  answer"]
    for row in rows:
        lines.append(
            f"{row.policy:<14} {row.prompt_tokens:>6} {row.kept_per_head:>9} {row.blocks_freed:>12} "
            f"{row.freed_mib:>9.1f} {row.seconds:>5.1f}  {row.answer[:70]}"
        )
    lines.append("blocks freed: KV blocks the engine returned to its pool after the prefill (all layers).")
    return "\n".join(lines)
