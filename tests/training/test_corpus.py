"""The built-in corpus: deterministic, held out by document, training text only, exportable."""

import dataclasses

from judgeq_vllm.cli import main
from judgeq_vllm.training.corpus import CorpusSpec, default_corpus, is_heldout
from judgeq_vllm.training.data import load_prompt_file


def _documents(record):
    kind, names = record.source.split(":", 1)
    return {f"{kind}:{name}" for name in names.split(",")}


def test_default_corpus_is_deterministic_and_labelled(tiny_corpus, tiny_spec):
    assert default_corpus(tiny_spec) == tiny_corpus
    assert [r.split for r in tiny_corpus] == ["train"] * tiny_spec.n_train + ["heldout"] * tiny_spec.n_heldout
    assert default_corpus(dataclasses.replace(tiny_spec, seed=1)) != tiny_corpus


def test_heldout_documents_never_reach_the_train_split(corpora_ready):
    records = default_corpus(CorpusSpec(n_train=60, n_heldout=30, min_chars=300, max_chars=600))
    train = set().union(*(_documents(r) for r in records if r.split == "train"))
    heldout = set().union(*(_documents(r) for r in records if r.split == "heldout"))
    assert train and heldout and not train & heldout
    assert all(is_heldout(doc) for doc in heldout) and not any(is_heldout(doc) for doc in train)
    # training text only: Shakespeare and chit-chat, never the essays RULER's haystacks use
    assert {doc.split(":")[0] for doc in train | heldout} == {"shakespeare", "chitchat"}
    assert {r.task for r in records} == {"summarise", "characters", "continue", "quote"}


def test_prompts_are_long_passages_with_an_instruction(tiny_corpus, tiny_spec):
    for record in tiny_corpus:
        (message,) = record.messages
        assert message["role"] == "user"
        assert tiny_spec.min_chars // 2 < len(message["content"]) < tiny_spec.max_chars + 400


def test_export_round_trips_through_the_cli(tmp_path, tiny_corpus, tiny_spec, capsys):
    out = tmp_path / "corpus.jsonl"
    spec = tiny_spec
    argv = ["corpus", "--out", str(out), "--n-train", str(spec.n_train), "--n-heldout", str(spec.n_heldout),
            "--min-chars", str(spec.min_chars), "--max-chars", str(spec.max_chars)]
    assert main(argv) == 0
    assert load_prompt_file(out) == tiny_corpus
    assert "3 train + 2 held-out prompts" in capsys.readouterr().out
