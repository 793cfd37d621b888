"""Run one of RULER's generator scripts offline (executed as a script by ``ruler.py``).

Usage: python _ruler_runner.py RULER_ROOT PUNKT_ROOT SCRIPT [SCRIPT ARGS...]

RULER's generators are command-line scripts that parse arguments, seed the global RNGs
and load a tokenizer at import time, so they run in a fresh interpreter each (as RULER's
own ``prepare.py`` does) rather than being imported. Before the script starts, this
runner:

* puts RULER's root (for ``long_context_eval``) and the script's folder (for its
  ``from constants import ...``) on ``sys.path``;
* replaces ``nltk.sent_tokenize`` with the ``punkt`` package, because the NLTK data
  download that ``sent_tokenize`` needs is not reachable;
* turns every outgoing network connection into an error and puts Hugging Face libraries
  in offline mode, so generation can never silently depend on the network.

Kept free of ``judgeq_vllm`` imports so that it runs with nothing but the interpreter.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys


def _refuse_network(*args, **kwargs):
    raise ConnectionRefusedError("judgeq-vllm: RULER data generation must not use the network")


def _block_network() -> None:
    socket.socket.connect = _refuse_network
    socket.socket.connect_ex = _refuse_network
    socket.create_connection = _refuse_network
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _patch_sentence_splitter(punkt_root: str) -> None:
    sys.path.insert(0, punkt_root)
    import nltk
    import nltk.tokenize
    import punkt

    def sent_tokenize(text: str, language: str = "english") -> list[str]:
        return punkt.sent_tokenize(text, language)

    # niah.py does `from nltk.tokenize import sent_tokenize` at import time, so both
    # names must be replaced before the script runs.
    nltk.sent_tokenize = sent_tokenize
    nltk.tokenize.sent_tokenize = sent_tokenize


def _forget_own_folder() -> None:
    """Python put this file's folder first on sys.path; its modules (``cli``, ``ruler``,
    ``store``...) must not shadow top-level modules of the script's dependencies."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [path for path in sys.path if os.path.abspath(path or ".") != here]


def main(argv: list[str]) -> None:
    ruler_root, punkt_root, script, *script_args = argv
    _forget_own_folder()
    _block_network()
    _patch_sentence_splitter(punkt_root)
    sys.path[:0] = [os.path.dirname(script), ruler_root]
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
