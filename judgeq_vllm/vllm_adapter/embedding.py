"""Soft-token embeddings inside vLLM's model, shared by the CPU and GPU runners.

Judge Q's soft tokens reach the worker as ids ``vocab + j`` (the scheduler appends them
to the prompt); the model's input embedding is wrapped so those ids embed as the
artifact's rows. Nothing else changes: no prompt-embeds tensor, and the output head keeps
the original weight (also when tied), so logits are unchanged. Under torch.compile the
wrapper is traced and captured in the CUDA graphs like the embedding it wraps.
"""

from __future__ import annotations

import torch

from ..policies import EvictionPolicy


class SoftTokenEmbedding(torch.nn.Module):
    """The model's input embedding, extended with the soft-token rows.

    Ids ``< vocab`` go to the wrapped embedding; id ``vocab + j`` gets soft row ``j``.
    """

    def __init__(self, inner: torch.nn.Module, vocab_size: int, soft_rows: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.vocab_size = vocab_size
        self.register_buffer("soft_rows", soft_rows, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_soft = input_ids >= self.vocab_size
        base = self.inner(torch.where(is_soft, torch.zeros_like(input_ids), input_ids))
        soft_index = (input_ids - self.vocab_size).clamp(0, self.soft_rows.shape[0] - 1)
        return torch.where(is_soft[:, None], self.soft_rows[soft_index].to(base.dtype), base)


def install_soft_token_embedding(
    model: torch.nn.Module, policy: EvictionPolicy, vocab_size: int, dtype: torch.dtype, device: torch.device
) -> None:
    """Wraps ``model.model.embed_tokens`` when the policy has soft tokens; else does nothing.

    Raises:
        ValueError: the model has no ``model.embed_tokens`` to wrap.
    """
    soft_tokens = getattr(policy, "soft_tokens", None)
    if soft_tokens is None:
        return
    language_model = getattr(model, "model", None)
    embedding = getattr(language_model, "embed_tokens", None)
    if embedding is None:
        raise ValueError(
            f"--kv-eviction judgeq: cannot find the input embedding (model.embed_tokens) of "
            f"{type(model).__name__}; use a query-window policy such as snapkv"
        )
    soft_rows = soft_tokens.embeddings.to(device, dtype)
    language_model.embed_tokens = SoftTokenEmbedding(embedding, vocab_size, soft_rows)
