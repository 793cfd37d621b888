"""Turn a GGUF checkpoint into a Hugging Face folder (dequantized safetensors + tokenizer)."""

from __future__ import annotations

from pathlib import Path

_GGUF_SPECIAL_TOKEN_FIELDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def convert_gguf_to_hf(gguf_file: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into an HF folder (bf16 safetensors + tokenizer).

    Args:
        gguf_file: the ``.gguf`` file.
        out: an existing empty folder.
    """
    # Imported here: fetching data assets must not pay for importing torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: plain dense weights. transformers >= 5.23 would otherwise keep the
    # GGUF blocks; 5.17 accepts the same argument, so one call serves both.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # A leftover quantization_config would make loaders (vLLM) treat the folder as GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    _restore_tokenizer_metadata(tokenizer, gguf_file)
    tokenizer.save_pretrained(out)


def _restore_tokenizer_metadata(tokenizer, gguf_file: Path) -> None:
    """Set the special tokens and context length recorded in the GGUF on ``tokenizer``.

    transformers 5.17 turns a GGUF's ``eos_token_id`` into ``<|im_start|>`` (id 1) for
    SmolLM2, whose GGUF says 2 (``<|im_end|>``, the end of a chat turn); copying the ids
    from the GGUF fields keeps the saved tokenizer consistent with ``generation_config``.
    """
    from gguf import GGUFReader

    fields = GGUFReader(gguf_file).fields
    for attribute, field in _GGUF_SPECIAL_TOKEN_FIELDS.items():
        if f"tokenizer.ggml.{field}" in fields:
            token_id = int(fields[f"tokenizer.ggml.{field}"].contents())
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
    context_length = f"{fields['general.architecture'].contents()}.context_length"
    if context_length in fields:
        tokenizer.model_max_length = int(fields[context_length].contents())
    # Off in SmolLM2's and Gemma's own tokenizers; on, transformers warns it corrupts BPE.
    tokenizer.clean_up_tokenization_spaces = False
