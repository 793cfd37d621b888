"""Fixtures of the training tests: a tiny built-in corpus and SmolLM2's responses to it.

Prompts are short (about 150 tokens) and responses 8 tokens, so that a training step takes
about a second on the 2-core CI machine.
"""

import pytest

from judgeq_vllm.training.corpus import CorpusSpec

TINY_CORPUS = CorpusSpec(n_train=3, n_heldout=2, min_chars=300, max_chars=450, seed=0)
MAX_PROMPT_TOKENS = 192
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="session")
def tiny_spec():
    return TINY_CORPUS


@pytest.fixture(scope="session")
def corpora_ready():
    from judgeq_vllm.assets.fetch import fetch_asset

    for name in ("shakespeare", "chitchat"):
        fetch_asset(name)  # idempotent: a no-op once `make assets` has run


@pytest.fixture(scope="session")
def tiny_corpus(corpora_ready):
    from judgeq_vllm.training.corpus import default_corpus

    return default_corpus(TINY_CORPUS)


@pytest.fixture(scope="session")
def response_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("responses")


def _samples(model, tokenizer, records, cache_dir):
    from judgeq_vllm.training.trainer import build_samples

    samples, empty = build_samples(
        model, tokenizer, records, MAX_PROMPT_TOKENS, MAX_NEW_TOKENS, cache_dir, show_progress=False
    )
    assert empty == 0
    return samples


@pytest.fixture(scope="session")
def train_samples(reference_model, tokenizer, tiny_corpus, response_cache_dir):
    return _samples(reference_model, tokenizer, [r for r in tiny_corpus if r.split == "train"], response_cache_dir)


@pytest.fixture(scope="session")
def heldout_samples(reference_model, tokenizer, tiny_corpus, response_cache_dir):
    return _samples(reference_model, tokenizer, [r for r in tiny_corpus if r.split == "heldout"], response_cache_dir)
