"""Training settings, importable without torch (the CLI reads its defaults from here)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the loss curve (a checkpoint resumes only with the same).

    Attributes:
        n_soft: soft tokens (the paper uses 32).
        steps: optimizer steps.
        batch_size: prompts per step (gradients accumulated one prompt at a time).
        lr: peak Adam learning rate.
        warmup_steps: linear warm-up steps, then a cosine decay to ``final_lr_ratio * lr``.
        final_lr_ratio: learning rate at the last step, relative to ``lr``.
        max_prompt_tokens: longer prompts are cut in the middle.
        max_new_tokens: length limit of the model's own responses (the targets).
        renormalize: renormalise attention rows over the prompt columns (see
            ``attention_maps``).
        seed: soft-token initialisation and sample order.
    """

    n_soft: int = 32
    steps: int = 800
    batch_size: int = 4
    lr: float = 5e-3
    warmup_steps: int = 20
    final_lr_ratio: float = 0.1
    max_prompt_tokens: int = 3072
    max_new_tokens: int = 64
    renormalize: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("n_soft", "steps", "batch_size", "max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or not 0 <= self.final_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, 0 <= final_lr_ratio <= 1 and warmup_steps >= 0")

    def learning_rate(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then cosine decay to ``final_lr_ratio * lr``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        done = (step - self.warmup_steps) / max(1, self.steps - 1 - self.warmup_steps)
        return self.lr * (self.final_lr_ratio + (1 - self.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))
