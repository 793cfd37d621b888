"""Prompt files in every accepted layout, the split labels, tokenization, and bad files."""

import json

import pytest

from judgeq_vllm.training.data import (
    PromptRecord,
    load_prompt_file,
    parse_record,
    select_split,
    tokenize_prompt,
    write_prompt_file,
)
from judgeq_vllm.training.errors import TrainingDataError

SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Tell me about Hamlet."},
        {"from": "gpt", "value": "A play."},
        {"from": "human", "value": "Who wrote it?"},
        {"from": "gpt", "value": "Shakespeare."},
    ]
}
MESSAGES = {
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]},
    ],
    "split": "heldout",
    "source": "doc-7",
}
EXPECTED = [
    (("system", "Be brief."), ("user", "Tell me about Hamlet."), ("assistant", "A play."), ("user", "Who wrote it?")),
    (("user", "Part one.\nPart two."),),
    (("user", "plain text prompt"),),
    (("user", "a prompt field"),),
    (("user", "a bare string"),),
]
RECORDS = [SHAREGPT, MESSAGES, {"text": "plain text prompt"}, {"prompt": "a prompt field"}, "a bare string"]


def _roles(record):
    return tuple((m["role"], m["content"]) for m in record.messages)


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_every_layout_is_read(tmp_path, layout):
    path = tmp_path / f"prompts.{layout}"
    if layout == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    else:
        path.write_text(json.dumps(RECORDS, indent=1))
    records = load_prompt_file(path)
    assert [_roles(r) for r in records] == EXPECTED
    # the trailing assistant turn is dropped: the model's own response is the target
    assert records[0].messages[-1]["role"] == "user"
    assert (records[1].split, records[1].source) == ("heldout", "doc-7")
    assert records[0].split is None


def test_single_json_object_file(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(SHAREGPT))
    assert [_roles(r) for r in load_prompt_file(path)] == EXPECTED[:1]


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
def test_write_and_read_back(tmp_path, name):
    records = [PromptRecord(({"role": "user", "content": "x"},), "train", "a", "summarise"), parse_record(SHAREGPT)]
    path = tmp_path / name
    write_prompt_file(records, path)
    assert load_prompt_file(path) == records


def test_split_selection():
    train = PromptRecord(({"role": "user", "content": "a"},), "train")
    held = PromptRecord(({"role": "user", "content": "b"},), "heldout")
    unlabelled = [PromptRecord(({"role": "user", "content": "c"},))]
    assert select_split([train, held], "heldout") == [held]
    assert select_split(unlabelled, "train") == unlabelled  # no labels: everything
    with pytest.raises(TrainingDataError, match="no 'train' record"):
        select_split([held], "train")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ('{"text": "ok"}\n{"text": broken\n', "neither a JSON document nor JSON lines: line 2"),
        ('{"foo": 1}\n{"messages": [{"role": "assistant", "content": "hi"}]}\n', "no usable prompt"),
        ('[{"conversations": [{"from": "alien", "value": "x"}]}]', "unknown ShareGPT speaker"),
        ('{"text": "x", "split": "test"}', "split 'test' is not one of train, heldout"),
    ],
)
def test_bad_files_raise_a_clear_error(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TrainingDataError, match=message):
        load_prompt_file(path)


def test_tokenize_applies_the_chat_template_and_cuts_the_middle(tokenizer):
    record = parse_record({"text": "word " * 400 + "THE QUESTION?"})
    full = tokenize_prompt(tokenizer, record, 10_000)
    assert tokenizer.decode(full).rstrip().endswith("assistant")  # generation prompt appended
    cut = tokenize_prompt(tokenizer, record, 64)
    assert len(cut) == 64 and cut[:32] == full[:32] and cut[32:] == full[-32:]
