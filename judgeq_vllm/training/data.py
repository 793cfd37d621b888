"""Training and evaluation prompts: reading them from JSON/JSONL files, and tokenizing them.

Accepted record layouts (one record per JSONL line, or a JSON list of records; a file
whose name ends in ``.gz`` is read through gzip):

- ShareGPT: ``{"conversations": [{"from": "human", "value": "..."}, ...]}``;
- chat: ``{"messages": [{"role": "user", "content": "..."}, ...]}`` (``content`` may be a
  list of ``{"type": "text", "text": ...}`` parts);
- plain text: ``{"text": "..."}`` or ``{"prompt": "..."}`` (or a bare JSON string), one
  user message.

A record may carry ``"split": "train" | "heldout"`` (the exported default corpus does), and
``"source"`` / ``"task"`` labels. The prompt is the conversation up to and including its
last user turn: the responses that train the soft tokens are the model's own, so any
later assistant turns are dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import TrainingDataError

SPLITS = ("train", "heldout")

# ShareGPT speaker names seen in the wild, mapped to chat roles
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
_CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt as chat messages, with its split and provenance labels.

    Attributes:
        messages: ``({"role": ..., "content": ...}, ...)`` ending with a user turn.
        split: ``"train"``, ``"heldout"`` or ``None`` (the file did not say).
        source: the document the text comes from (held-out splits are by document).
        task: what the instruction asks (summarise, quote, continue, ...), if known.
    """

    messages: tuple[dict[str, str], ...]
    split: str | None = None
    source: str | None = None
    task: str | None = None

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"messages": [dict(message) for message in self.messages]}
        for name in ("split", "source", "task"):
            if getattr(self, name) is not None:
                record[name] = getattr(self, name)
        return record


def load_prompt_file(path: str | os.PathLike) -> list[PromptRecord]:
    """Reads every record of a JSON or JSONL prompt file.

    Raises:
        TrainingDataError: the file is missing or unreadable, is neither JSON nor JSONL,
            or holds no usable prompt (the message quotes the first problem found).
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"prompt file {str(path)!r} does not exist")
    try:
        data = path.read_bytes()
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TrainingDataError(f"prompt file {str(path)!r} cannot be read as UTF-8 text: {exc}") from exc
    raw = list(_parse_records(text, path))
    records, problems = [], []
    for where, item in raw:
        try:
            records.append(parse_record(item))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if not records:
        first = f"; first problem: {problems[0]}" if problems else ""
        raise TrainingDataError(
            f"prompt file {str(path)!r} holds no usable prompt ({len(raw)} records{first}). Expected JSON or "
            f"JSONL records like {{\"messages\": [{{\"role\": \"user\", \"content\": ...}}]}}, "
            f"{{\"conversations\": [{{\"from\": \"human\", \"value\": ...}}]}} or {{\"text\": ...}}"
        )
    return records


def _parse_records(text: str, path: Path) -> Iterable[tuple[str, Any]]:
    """``(location, decoded record)`` pairs: a whole-file JSON document, else JSON lines."""
    if not text.strip():
        raise TrainingDataError(f"prompt file {str(path)!r} is empty")
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        pass  # not one JSON document: read it as JSON lines
    else:
        items = document if isinstance(document, list) else [document]
        return [(f"record {index}", item) for index, item in enumerate(items)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise TrainingDataError(
                f"prompt file {str(path)!r} is neither a JSON document nor JSON lines: line {number}: {exc.msg}"
            ) from None
    return records


def parse_record(item: Any) -> PromptRecord:
    """One decoded JSON record as a :class:`PromptRecord`.

    Raises:
        ValueError: an unknown layout, an unknown role or split, or no user turn.
    """
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict):
        raise ValueError(f"a record must be a JSON object or string, got {type(item).__name__}")
    if "conversations" in item:
        messages = [_sharegpt_turn(turn) for turn in _as_list(item["conversations"], "conversations")]
    elif "messages" in item:
        messages = [_chat_turn(turn) for turn in _as_list(item["messages"], "messages")]
    elif isinstance(item.get("prompt"), list):
        messages = [_chat_turn(turn) for turn in item["prompt"]]
    elif isinstance(item.get("text", item.get("prompt")), str):
        messages = [{"role": "user", "content": item.get("text", item.get("prompt"))}]
    else:
        raise ValueError(f"no 'conversations', 'messages', 'text' or 'prompt' field (keys: {sorted(item)})")
    last_user = max((i for i, message in enumerate(messages) if message["role"] == "user"), default=None)
    if last_user is None or not messages[last_user]["content"].strip():
        raise ValueError("no non-empty user turn")
    split = item.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return PromptRecord(
        messages=tuple(messages[: last_user + 1]),
        split=split,
        source=_optional_str(item.get("source")),
        task=_optional_str(item.get("task")),
    )


def _as_list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{name!r} must be a list")
    return value


def _sharegpt_turn(turn: Any) -> dict[str, str]:
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise ValueError("a ShareGPT turn needs a string 'value'")
    speaker = str(turn.get("from", "")).lower()
    if speaker not in _SHAREGPT_ROLES:
        raise ValueError(f"unknown ShareGPT speaker {turn.get('from')!r}")
    return {"role": _SHAREGPT_ROLES[speaker], "content": turn["value"]}


def _chat_turn(turn: Any) -> dict[str, str]:
    if not isinstance(turn, dict) or turn.get("role") not in _CHAT_ROLES:
        raise ValueError(f"a chat message needs a role among {', '.join(_CHAT_ROLES)}")
    content = turn.get("content")
    if isinstance(content, list):  # OpenAI-style content parts: keep the text ones
        content = "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise ValueError("a chat message needs string content")
    return {"role": turn["role"], "content": content}


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def select_split(records: Sequence[PromptRecord], split: str) -> list[PromptRecord]:
    """The records of ``split``; all of them when the file carries no split labels.

    Raises:
        TrainingDataError: the file labels splits but none of its records is in ``split``.
    """
    if all(record.split is None for record in records):
        return list(records)
    chosen = [record for record in records if record.split == split]
    if not chosen:
        raise TrainingDataError(f"the prompt file labels splits but has no {split!r} record")
    return chosen


def write_prompt_file(records: Iterable[PromptRecord], path: str | os.PathLike) -> int:
    """Writes records as JSONL (gzip-compressed if the name ends in ``.gz``); returns bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record.to_json(), ensure_ascii=False) for record in records]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    # mtime=0: the same corpus always compresses to the same bytes
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path.stat().st_size


def tokenize_prompt(tokenizer, record: PromptRecord, max_tokens: int) -> list[int]:
    """Token ids of a prompt as the model is served it, cut in the middle if too long.

    The chat template (with the generation prompt) is applied when the tokenizer has one;
    otherwise the messages' contents are joined by blank lines. A prompt over
    ``max_tokens`` keeps its first and last halves (LongBench's truncation), so both the
    template's head and the final instruction survive.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(record.messages), add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer.encode("\n\n".join(message["content"] for message in record.messages))
    if len(ids) > max_tokens:
        head = max_tokens // 2
        ids = ids[:head] + ids[len(ids) - (max_tokens - head) :]
    return ids


def prompt_hash(token_ids: Sequence[int]) -> str:
    """sha256 of a token sequence: the key of cached responses."""
    return hashlib.sha256(json.dumps(list(token_ids)).encode()).hexdigest()
