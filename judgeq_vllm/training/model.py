"""The model side of training: which models qualify, loading, and proving it stays frozen."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator

import torch

from .errors import TrainingError, UnsupportedModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model: str | None) -> str:
    """A local HF folder, the embedded SmolLM2 (``None``, ``smollm2`` or its folder name),
    or a name passed through to ``from_pretrained``."""
    if model is None or model.lower() in ("smollm2", "smollm2-135m-instruct"):
        from ..assets.smollm2 import smollm2_path

        return str(smollm2_path())
    return str(Path(model).expanduser()) if Path(model).expanduser().exists() else model


def resolve_device(device: str) -> torch.device:
    """``auto``: the CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 weights on a GPU (as vLLM serves them), fp32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_full_attention(config, name: str) -> None:
    """Refuses models whose layers are not all full causal self-attention.

    Judge Q scores, per layer, the prompt keys that every later query can see; a
    sliding-window or chunked layer forgets keys by itself, MLA caches no per-head keys,
    and an encoder-decoder's prompt lives in another stack.

    Raises:
        UnsupportedModelError: naming every reason.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    reasons = []
    if getattr(config, "is_encoder_decoder", False):
        reasons.append("it is an encoder-decoder model")
    if getattr(text, "kv_lora_rank", None) or getattr(text, "q_lora_rank", None):
        reasons.append("it uses MLA attention")
    if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True) is not False:
        reasons.append(f"it uses sliding-window attention (sliding_window={text.sliding_window})")
    if getattr(text, "attention_chunk_size", None):
        reasons.append("it uses chunked attention")
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        reasons.append(f"its layers are not all full attention ({', '.join(sorted(layer_types))})")
    if reasons:
        raise UnsupportedModelError(
            f"Judge Q soft tokens need a decoder-only model whose layers are all full attention "
            f"(Llama, Mistral without sliding window, Qwen2/3); {name!r} is refused because {'; '.join(reasons)}"
        )


def load_training_model(path: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Checks the config, then loads the model with the recording attention, in eval mode.

    Raises:
        UnsupportedModelError: see :func:`check_full_attention`.
        TrainingError: the folder has no loadable config.
    """
    from transformers import AutoConfig

    from ..reference import load_reference_model

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot read a model config from {path!r}: {exc}") from exc
    check_full_attention(config, path)
    return load_reference_model(path, dtype=dtype).to(device)


def parameter_digests(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every parameter and buffer's bytes, by name."""
    digests = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digests[name] = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
    return digests


def changed_parameters(model: torch.nn.Module, before: dict[str, str]) -> list[str]:
    """Names whose bytes differ from ``before`` (from :func:`parameter_digests`)."""
    after = parameter_digests(model)
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Turns off gradients of every model parameter for the block, then restores the flags:
    only the soft tokens (a separate tensor) are trained, and no weight gradient is ever
    computed or stored."""
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
