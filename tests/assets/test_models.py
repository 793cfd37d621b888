"""The prepared model folders: SmolLM2 (real weights) and Llama-3.1-8B (config only)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from judgeq_vllm.assets import llama31_8b_path, smollm2_path


def test_smollm2_folder_says_where_its_weights_come_from(smollm2_dir):
    assert smollm2_path() == Path(smollm2_dir)
    provenance = json.loads((smollm2_path() / "judgeq_asset.json").read_text())
    assert "Q4_1" in provenance["weights"] and "NOT the original" in provenance["weights"]
    config = json.loads((smollm2_path() / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_smollm2_tokenizer_ends_turns_with_im_end(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.model_max_length == 8192


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_knows_the_capital_of_france(smollm2_dir, smollm2_tokenizer, dtype):
    tokenizer = smollm2_tokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=dtype).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.fixture(scope="module")
def llama31_tokenizer(llama31_dir):
    return AutoTokenizer.from_pretrained(llama31_dir)


def test_llama31_tokenizer_encodes_like_llama3(llama31_tokenizer):
    tokenizer = llama31_tokenizer
    assert tokenizer("Hello world, this is a test.")["input_ids"] == [
        128000, 9906, 1917, 11, 420, 374, 264, 1296, 13,
    ]
    assert len(tokenizer) == 128256  # Llama 3.2's <|image|> token is dropped
    assert tokenizer.eos_token == "<|eot_id|>"


def test_llama31_config_has_the_8b_shape(llama31_dir):
    config = AutoConfig.from_pretrained(llama31_dir)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (
        4096, 32, 14336,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (
        32, 8, 128256,
    )
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["factor"] == 8.0
    assert config.max_position_embeddings == 131072
    assert config.eos_token_id == [128001, 128008, 128009]
    assert not config.tie_word_embeddings
    assert not list(llama31_8b_path().glob("*.safetensors"))


def test_llama31_chat_template_renders_llama31_headers(llama31_tokenizer):
    text = llama31_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True, tokenize=False,
    )
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
