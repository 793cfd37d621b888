"""Training Judge Q's soft tokens: only their embeddings move, the model stays bit-identical.

One step: for each prompt of the batch, a gradient-free prefill of prompt + the model's own
response yields the target maps (the response tokens' mean attention over the prompt, per
layer and query head) and the prompt's KV; the soft tokens then run on that KV with
gradients, and each layer's loss term is computed from their captured queries and keys
(see ``attention_maps`` and ``forward``). Gradients are accumulated over the batch, then
one Adam step.

Runs are deterministic (the sample order and the learning rate are functions of the step
and the seed), and a checkpoint holds the soft tokens, Adam's state and the losses so far,
so a resumed run continues the exact loss curve of an uninterrupted one (on the CPU; GPU
kernels may differ in the last bits).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..soft_tokens import SoftTokens, hf_model_fingerprint, init_soft_tokens
from .attention_maps import layer_loss, mean_prompt_attention
from .config import TrainConfig
from .data import PromptRecord, prompt_hash, tokenize_prompt
from .errors import CheckpointError, TrainingDataError, TrainingError
from .forward import attention_scale, prefill, soft_token_forward, truncated_cache
from .model import changed_parameters, frozen, parameter_digests
from .progress import progress
from .responses import model_responses

CHECKPOINT_FORMAT = "judgeq-train-checkpoint/1"
# The attention maps' entries are ~1/prompt_len, so the loss is ~1e-5..1e-7 and its
# gradients ~1e-7..1e-9: below Adam's default eps (1e-8), which would then set the step
# size. A smaller eps keeps Adam's update independent of the loss scale.
ADAM_EPS = 1e-12
# points of the loss curve kept in the artifact's metadata
CURVE_POINTS = 50


@dataclass(frozen=True)
class TrainingSample:
    """A tokenized prompt and the model's own response to it (stop token excluded)."""

    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class TrainResult:
    """What a (possibly partial) run produced.

    Attributes:
        soft_tokens: the artifact, ``training`` filled with the run summary.
        losses: the loss of every step run so far, resumed steps included.
        complete: whether all ``config.steps`` steps are done (a run stopped by a step or
            time limit is resumed from its checkpoint).
    """

    soft_tokens: SoftTokens
    losses: list[float]
    complete: bool


@dataclass(frozen=True)
class RunLimits:
    """When this invocation stops before the run is complete (a checkpoint is saved).

    Attributes:
        max_steps: steps run by this invocation at most.
        max_seconds: wall time of the training loop at most (checked after each step).
    """

    max_steps: int | None = None
    max_seconds: float | None = None


def build_samples(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[PromptRecord],
    max_prompt_tokens: int,
    max_new_tokens: int,
    cache_dir: str | os.PathLike,
    gen_batch_size: int = 16,
    show_progress: bool = True,
) -> tuple[list[TrainingSample], int]:
    """Tokenizes the prompts and gets the model's responses (cached).

    Returns:
        The samples with a non-empty response, and how many prompts had an empty one.

    Raises:
        TrainingDataError: no prompt, or the model answered none of them.
    """
    if not records:
        raise TrainingDataError("there is no prompt to train or evaluate on (empty corpus)")
    prompts = [tokenize_prompt(tokenizer, record, max_prompt_tokens) for record in records]
    responses = model_responses(model, tokenizer, prompts, max_new_tokens, cache_dir, gen_batch_size, show_progress)
    samples = [TrainingSample(ids, response) for ids, response in zip(prompts, responses) if response]
    if not samples:
        raise TrainingDataError(
            f"the model's response to every one of the {len(prompts)} prompts is empty (it stops at once): "
            f"there is no response attention to learn from"
        )
    return samples, len(prompts) - len(samples)


def sample_loss(
    model: torch.nn.Module, soft: torch.Tensor, sample: TrainingSample, scale: float, renormalize: bool
) -> torch.Tensor:
    """The Judge Q loss of one prompt (differentiable in ``soft``): MSE between the soft
    tokens' and the response tokens' mean attention over the prompt, averaged over layers
    and query heads."""
    prompt_len = len(sample.prompt_ids)
    targets: dict[int, torch.Tensor] = {}

    def record_target(layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        targets[layer] = mean_prompt_attention(query[:, prompt_len:], key, prompt_len, scale, renormalize)

    cache = prefill(model, sample.prompt_ids + sample.response_ids, record_target)
    terms: list[torch.Tensor] = []

    def record_loss(layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        terms.append(layer_loss(query, key, targets[layer], scale, renormalize))

    soft_token_forward(model, soft, truncated_cache(cache, prompt_len, model.config), record_loss)
    return torch.stack(terms).mean()


class SampleOrder:
    """A fresh seeded permutation of the samples every epoch; step ``s`` takes the next
    ``batch_size`` of them, whatever ran before (so a resumed run sees the same batches)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self._epochs: dict[int, list[int]] = {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            rng = random.Random(f"judgeq-train:{self.seed}:{epoch}")
            self._epochs[epoch] = rng.sample(range(self.num_samples), self.num_samples)
        return self._epochs[epoch]

    def batch(self, step: int) -> list[int]:
        first = step * self.batch_size
        return [
            self._epoch(index // self.num_samples)[index % self.num_samples]
            for index in range(first, first + self.batch_size)
        ]


def data_digest(samples: Sequence[TrainingSample]) -> str:
    """sha256 over the samples' prompts and responses, in order."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update((prompt_hash(sample.prompt_ids) + prompt_hash(sample.response_ids)).encode())
    return digest.hexdigest()


def train_soft_tokens(
    model: torch.nn.Module,
    samples: Sequence[TrainingSample],
    config: TrainConfig,
    model_name: str,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    limits: RunLimits = RunLimits(),
    summary: dict | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Trains (or resumes training) soft tokens on ``samples``.

    Args:
        model: from ``load_training_model``; its weights are never changed (checked).
        samples: from :func:`build_samples`.
        config: the run's settings.
        model_name: readable name stored in the artifact.
        checkpoint_path: where checkpoints go (``None``: no checkpoints).
        checkpoint_every: steps between checkpoints (one is also written when the run
            stops early or completes).
        resume: continue from ``checkpoint_path`` if it exists (it must have been written
            with the same settings, model and data).
        limits: stop this invocation early (the run stays resumable).
        summary: extra entries for the artifact's ``training`` metadata (data source...).

    Raises:
        CheckpointError: an unreadable checkpoint, or one of another run.
        TrainingError: a model weight changed during training (never expected).
    """
    if not samples:
        raise TrainingDataError("there is no training sample")
    device = model.device
    fingerprint = hf_model_fingerprint(model)
    run_key = {**asdict(config), "model_fingerprint": fingerprint, "data_sha256": data_digest(samples)}
    initial = init_soft_tokens(model, model_name, config.n_soft, config.seed)
    soft = torch.nn.Parameter(initial.embeddings.to(device))
    optimizer = torch.optim.Adam([soft], lr=config.lr, eps=ADAM_EPS)
    losses: list[float] = []
    if resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
        losses = _load_checkpoint(checkpoint_path, run_key, soft, optimizer)
    start_step = len(losses)

    scale = attention_scale(model)
    order = SampleOrder(len(samples), config.batch_size, config.seed)
    before = parameter_digests(model)
    bar = progress(config.steps, "training soft tokens", initial=start_step, enabled=show_progress)
    started = time.monotonic()
    step = start_step
    with frozen(model):
        while step < config.steps:
            lr = config.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for index in order.batch(step):
                loss = sample_loss(model, soft, samples[index], scale, config.renormalize) / config.batch_size
                loss.backward()
                total += loss.item()
            optimizer.step()
            losses.append(total)
            step += 1
            bar.set_postfix_str(f"loss {total:.4e} lr {lr:.2e}")
            bar.update()
            stop_early = (limits.max_steps is not None and step - start_step >= limits.max_steps) or (
                limits.max_seconds is not None and time.monotonic() - started >= limits.max_seconds
            )
            if checkpoint_path is not None and (step % checkpoint_every == 0 or step == config.steps or stop_early):
                _save_checkpoint(checkpoint_path, run_key, soft, optimizer, losses)
            if stop_early:
                break
    bar.close()

    changed = changed_parameters(model, before)
    if changed:
        raise TrainingError(f"training changed model weights, which must stay frozen: {', '.join(changed[:5])}")
    complete = len(losses) == config.steps
    training = {
        **(summary or {}),
        **_summary(config, losses, samples, complete, model),
        "init_seed": config.seed,
        "train_wall_s": round(time.monotonic() - started, 1),
    }
    artifact = SoftTokens(soft.detach().cpu().float().clone(), model_name, fingerprint, training)
    return TrainResult(artifact, losses, complete)


def _summary(config: TrainConfig, losses: list[float], samples: Sequence[TrainingSample], complete: bool, model) -> dict:
    import transformers

    window = max(1, min(10, len(losses) // 10))
    stride = max(1, math.ceil(len(losses) / CURVE_POINTS))
    prompt_lengths = [len(sample.prompt_ids) for sample in samples]
    response_lengths = [len(sample.response_ids) for sample in samples]
    return {
        "trained": True,
        "complete": complete,
        "steps_done": len(losses),
        "config": asdict(config),
        "init": "embedding_rows",
        "loss": "MSE between the soft tokens' and the response tokens' mean attention over the prompt, "
                "mean over layers and query heads",
        "normalization": "renormalized over the prompt columns" if config.renormalize
                         else "model softmax rows restricted to the prompt columns",
        "optimizer": {"name": "adam", "eps": ADAM_EPS, "schedule": "linear warm-up, cosine decay"},
        "loss_first": statistics.fmean(losses[:window]) if losses else None,
        "loss_last": statistics.fmean(losses[-window:]) if losses else None,
        "loss_curve": [[step, losses[step]] for step in range(0, len(losses), stride)],
        "n_samples": len(samples),
        "prompt_tokens": {"min": min(prompt_lengths), "mean": round(statistics.fmean(prompt_lengths), 1), "max": max(prompt_lengths)},
        "response_tokens_mean": round(statistics.fmean(response_lengths), 1),
        "data_sha256": data_digest(samples),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "frozen_weights_verified": True,
    }


def _save_checkpoint(path, run_key: dict, soft: torch.Tensor, optimizer: torch.optim.Optimizer, losses: list[float]) -> None:
    """Writes the checkpoint atomically (a killed run never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "run": run_key,
            "soft": soft.detach().cpu(),
            "optimizer": optimizer.state_dict(),
            "losses": list(losses),
        },
        tmp,
    )
    os.replace(tmp, path)


def _load_checkpoint(path, run_key: dict, soft: torch.Tensor, optimizer: torch.optim.Optimizer) -> list[float]:
    """Restores ``soft`` and ``optimizer`` in place; returns the losses of the steps done."""
    try:
        state = torch.load(path, map_location=soft.device, weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a soft-token training checkpoint")
    differing = sorted(name for name in run_key.keys() | state["run"].keys() if run_key.get(name) != state["run"].get(name))
    if differing:
        details = ", ".join(f"{name}: {state['run'].get(name)!r} -> {run_key.get(name)!r}" for name in differing)
        raise CheckpointError(
            f"checkpoint {str(path)!r} belongs to a run with other settings ({details}); "
            f"rerun with the checkpoint's settings, or start afresh without --resume"
        )
    with torch.no_grad():
        soft.copy_(state["soft"].to(soft.device))
    optimizer.load_state_dict(state["optimizer"])
    return [float(loss) for loss in state["losses"]]
