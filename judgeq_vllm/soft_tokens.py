"""The soft-token artifact: Judge Q's trained embeddings and the model they belong to.

File format: one safetensors file holding ``embeddings`` ``[n_soft, hidden]`` (fp32) and
string metadata:

- ``format``: ``judgeq-soft-tokens/1``;
- ``base_model``: a readable name of the model the embeddings were trained for;
- ``model_fingerprint``: sha256 of that model's architecture fields and its input
  embedding matrix (see :func:`model_fingerprint`), so an artifact is never used with a
  model whose embedding space it was not trained in;
- ``n_soft``, ``hidden_size``, ``dtype`` (of the stored tensor);
- ``training``: JSON summary of how it was made (``{"trained": false, ...}`` for an
  untrained initialisation).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "judgeq-soft-tokens/1"

# Architecture fields that decide whether an embedding space (and the attention it
# feeds) is the same; names as in HF config.json.
FINGERPRINT_CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rope_theta",
)


class SoftTokenArtifactError(ValueError):
    """An artifact that is missing, malformed, or made for another model."""


def model_fingerprint(config: Mapping[str, Any], embedding: torch.Tensor) -> str:
    """sha256 over the architecture fields and the input embedding matrix.

    The matrix is hashed after rounding to bf16, so the same checkpoint loaded in fp32 or
    bf16 gives the same fingerprint.

    Args:
        config: the model's HF config as a dict (``PretrainedConfig.to_dict()`` or
            config.json).
        embedding: ``[vocab, hidden]`` input embedding weights (extra padded rows beyond
            ``config["vocab_size"]`` are ignored).
    """
    digest = hashlib.sha256()
    arch = {name: config.get(name) for name in FINGERPRINT_CONFIG_FIELDS}
    if arch["rope_theta"] is None:
        # transformers 5 moved rope_theta into rope_parameters
        arch["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta")
    digest.update(json.dumps(arch, sort_keys=True).encode())
    rows = embedding[: config.get("vocab_size") or embedding.shape[0]]
    digest.update(rows.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def hf_model_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of a loaded HF causal LM (cached on the model object)."""
    cached = getattr(model, "_judgeq_fingerprint", None)
    if cached is None:
        cached = model_fingerprint(model.config.to_dict(), model.get_input_embeddings().weight)
        model._judgeq_fingerprint = cached
    return cached


def checkpoint_fingerprint(model_dir: str | os.PathLike) -> str:
    """Fingerprint of an HF checkpoint folder, read from its files without building the model.

    This is what the vLLM plugin checks at start-up, before any worker exists.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    embedding = _read_checkpoint_tensor(model_dir, ("model.embed_tokens.weight", "embed_tokens.weight"))
    return model_fingerprint(config, embedding)


def _read_checkpoint_tensor(model_dir: Path, names: tuple[str, ...]) -> torch.Tensor:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SoftTokenArtifactError(f"{model_dir} has no *.safetensors weights to fingerprint")
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                if name in handle.keys():
                    return handle.get_tensor(name)
    raise SoftTokenArtifactError(f"no input embedding ({' or '.join(names)}) found in {model_dir}")


@dataclass(frozen=True)
class SoftTokens:
    """Judge Q soft-token embeddings and where they come from.

    Attributes:
        embeddings: ``[n_soft, hidden]`` fp32.
        base_model: readable name of the model they were trained for.
        model_fingerprint: :func:`model_fingerprint` of that model.
        training: summary of the training run (free-form, JSON-serialisable).
    """

    embeddings: torch.Tensor
    base_model: str
    model_fingerprint: str
    training: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embeddings.shape[1]

    def check_model(self, model_name: str, fingerprint: str) -> None:
        """Raises :class:`SoftTokenArtifactError` unless the artifact was made for this model."""
        if fingerprint != self.model_fingerprint:
            raise SoftTokenArtifactError(
                f"soft-token artifact was trained for model {self.base_model!r} "
                f"(fingerprint {self.model_fingerprint[:12]}) but is being used with model "
                f"{model_name!r} (fingerprint {fingerprint[:12]}); train an artifact for "
                f"{model_name!r} with `judgeq-vllm train --model ...`"
            )

    def save(self, path: str | os.PathLike) -> None:
        metadata = {
            "format": FORMAT,
            "base_model": self.base_model,
            "model_fingerprint": self.model_fingerprint,
            "n_soft": str(self.num_tokens),
            "hidden_size": str(self.hidden_size),
            "dtype": "float32",
            "training": json.dumps(self.training, sort_keys=True),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.detach().to("cpu", torch.float32).contiguous()}, str(path), metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SoftTokens":
        path = Path(path)
        if not path.is_file():
            raise SoftTokenArtifactError(
                f"soft-token artifact {str(path)!r} does not exist; train one with `judgeq-vllm train`"
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                embeddings = handle.get_tensor("embeddings")
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise SoftTokenArtifactError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
        if metadata.get("format") != FORMAT:
            raise SoftTokenArtifactError(
                f"{str(path)!r} is not a soft-token artifact (format {metadata.get('format')!r}, expected {FORMAT!r})"
            )
        if embeddings.ndim != 2 or embeddings.shape[0] != int(metadata["n_soft"]):
            raise SoftTokenArtifactError(f"{str(path)!r}: embeddings of shape {tuple(embeddings.shape)} do not match n_soft")
        return cls(
            embeddings=embeddings.float(),
            base_model=metadata["base_model"],
            model_fingerprint=metadata["model_fingerprint"],
            training=json.loads(metadata.get("training") or "{}"),
        )


def init_soft_tokens(model: torch.nn.Module, base_model: str, n_soft: int = 32, seed: int = 0) -> SoftTokens:
    """Untrained soft tokens: copies of randomly chosen rows of the model's embedding matrix.

    Starting from real token embeddings keeps the soft tokens inside the distribution the
    model's first layer expects; training then moves them. (The paper does not say how it
    initialises them.)
    """
    if n_soft < 1:
        raise ValueError(f"n_soft={n_soft} must be >= 1")
    weight = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, model.config.vocab_size, (n_soft,), generator=generator)
    return SoftTokens(
        embeddings=weight[rows].detach().float().cpu().clone(),
        base_model=base_model,
        model_fingerprint=hf_model_fingerprint(model),
        training={"trained": False, "init": "embedding_rows", "seed": seed},
    )
