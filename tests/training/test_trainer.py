"""Training on SmolLM2 with a tiny corpus: the loss falls, the model stays bit-identical,
a resumed run continues the exact loss curve, and the artifact fits the model."""

import dataclasses

import pytest
import torch

from judgeq_vllm.soft_tokens import SoftTokens, checkpoint_fingerprint, init_soft_tokens
from judgeq_vllm.training.config import TrainConfig
from judgeq_vllm.training.errors import CheckpointError
from judgeq_vllm.training.forward import attention_scale
from judgeq_vllm.training.trainer import RunLimits, sample_loss, train_soft_tokens

# 3 prompts, 2 per step: the sample order wraps across epochs within the run
CONFIG = TrainConfig(n_soft=32, steps=4, batch_size=2, lr=2e-2, warmup_steps=0, final_lr_ratio=1.0,
                     max_prompt_tokens=192, max_new_tokens=8)
NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def weights_before(reference_model):
    return {name: tensor.clone() for name, tensor in reference_model.state_dict().items()}


@pytest.fixture(scope="module")
def full_run(reference_model, train_samples, weights_before, tmp_path_factory):
    """The uninterrupted run."""
    return train_soft_tokens(reference_model, train_samples, CONFIG, NAME,
                             checkpoint_path=tmp_path_factory.mktemp("full") / "run.ckpt", show_progress=False)


def _mean_loss(model, soft, samples):
    with torch.no_grad():
        return sum(sample_loss(model, soft, s, attention_scale(model), False).item() for s in samples) / len(samples)


def test_training_reduces_the_loss(reference_model, train_samples, full_run):
    assert full_run.complete and len(full_run.losses) == CONFIG.steps
    initial = init_soft_tokens(reference_model, NAME, CONFIG.n_soft, full_run.soft_tokens.training["init_seed"])
    before = _mean_loss(reference_model, initial.embeddings, train_samples)
    after = _mean_loss(reference_model, full_run.soft_tokens.embeddings, train_samples)
    assert after < 0.8 * before, (before, after)  # about 0.5 * before in practice


def test_only_the_soft_tokens_train(reference_model, weights_before, full_run):
    after = reference_model.state_dict()
    assert after.keys() == weights_before.keys()
    for name, tensor in weights_before.items():
        assert torch.equal(after[name], tensor), name
    assert full_run.soft_tokens.training["frozen_weights_verified"] is True
    assert all(param.requires_grad for param in reference_model.parameters())  # flags restored


def test_resumed_run_continues_the_same_loss_curve(reference_model, train_samples, full_run, tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    half = CONFIG.steps // 2
    first = train_soft_tokens(reference_model, train_samples, CONFIG, NAME, checkpoint_path=checkpoint,
                              limits=RunLimits(max_steps=half), show_progress=False)
    assert not first.complete and first.losses == full_run.losses[:half]
    assert first.soft_tokens.training["complete"] is False
    resumed = train_soft_tokens(reference_model, train_samples, CONFIG, NAME, checkpoint_path=checkpoint,
                                resume=True, show_progress=False)
    assert resumed.complete
    assert resumed.losses[half:] == full_run.losses[half:]
    assert torch.equal(resumed.soft_tokens.embeddings, full_run.soft_tokens.embeddings)

    with pytest.raises(CheckpointError, match=r"other settings \(lr: 0.02 -> 0.01\)"):
        train_soft_tokens(reference_model, train_samples, dataclasses.replace(CONFIG, lr=1e-2), NAME,
                          checkpoint_path=checkpoint, resume=True, show_progress=False)


def test_artifact_round_trips_and_fits_the_model(smollm2_dir, full_run, tmp_path):
    path = tmp_path / "soft.safetensors"
    full_run.soft_tokens.save(path)
    artifact = SoftTokens.load(path)
    artifact.check_model(NAME, checkpoint_fingerprint(smollm2_dir))  # the fingerprint vLLM checks
    assert torch.equal(artifact.embeddings, full_run.soft_tokens.embeddings)
    training = artifact.training
    assert training["trained"] and training["steps_done"] == CONFIG.steps
    assert training["config"] == dataclasses.asdict(CONFIG)
    assert len(training["loss_curve"]) == CONFIG.steps
