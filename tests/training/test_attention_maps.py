"""The attention maps training compares, checked against the model's own attention weights.

The target (response rows out of one prefill) and the prediction (soft tokens run on the
prompt's cached KV) must both equal what HF's eager attention returns for the whole
sequence run at once; this also checks that several new tokens attending to a cache get
a correct causal mask.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from judgeq_vllm.training.attention_maps import mean_prompt_attention
from judgeq_vllm.training.forward import attention_scale, prefill, soft_token_forward, truncated_cache

PROMPT, RESPONSE = 90, 12


@pytest.fixture(scope="module")
def eager_model(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(100, 40_000, (PROMPT + RESPONSE,), generator=torch.Generator().manual_seed(0)).tolist()


def _eager_prompt_attention(eager_model, embeds, start):
    with torch.no_grad():
        attentions = eager_model(inputs_embeds=embeds[None], output_attentions=True).attentions
    return [layer[0, :, start:, :PROMPT].mean(dim=1) for layer in attentions]


def test_target_maps_match_eager_attention(reference_model, eager_model, tokens):
    scale, maps = attention_scale(reference_model), {}
    prefill(reference_model, tokens, lambda l, q, k: maps.__setitem__(l, mean_prompt_attention(q[:, PROMPT:], k, PROMPT, scale)))
    embeds = eager_model.get_input_embeddings()(torch.tensor(tokens))
    for layer, expected in enumerate(_eager_prompt_attention(eager_model, embeds, PROMPT)):
        torch.testing.assert_close(maps[layer], expected, atol=2e-6, rtol=1e-4)


def test_soft_tokens_on_the_cached_prompt_match_a_full_forward(reference_model, eager_model, soft_tokens, tokens):
    scale, maps = attention_scale(reference_model), {}
    cache = prefill(reference_model, tokens, lambda *_: None)
    prompt_cache = truncated_cache(cache, PROMPT, reference_model.config)
    assert cache.get_seq_length() == PROMPT + RESPONSE  # the source cache is left as it was
    with torch.no_grad():
        soft_token_forward(reference_model, soft_tokens.embeddings, prompt_cache,
                           lambda l, q, k: maps.__setitem__(l, mean_prompt_attention(q, k, PROMPT, scale)))
    embeds = torch.cat([eager_model.get_input_embeddings()(torch.tensor(tokens[:PROMPT])), soft_tokens.embeddings])
    for layer, expected in enumerate(_eager_prompt_attention(eager_model, embeds, PROMPT)):
        torch.testing.assert_close(maps[layer], expected, atol=2e-6, rtol=1e-4)


def test_chunking_and_renormalisation():
    generator = torch.Generator().manual_seed(1)
    query, key = torch.randn(6, 10, 8, generator=generator), torch.randn(2, 40, 8, generator=generator)
    whole = mean_prompt_attention(query, key, 25, 0.3)
    chunked = mean_prompt_attention(query, key, 25, 0.3, chunk_elements=1)  # one query row at a time
    torch.testing.assert_close(chunked, whole)
    assert (whole.sum(dim=-1) < 1).all()  # rows also attend past the prompt
    torch.testing.assert_close(mean_prompt_attention(query, key, 25, 0.3, renormalize=True).sum(dim=-1), torch.ones(6))
