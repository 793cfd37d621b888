"""Exceptions of the training subsystem: each message says what is wrong and what to do.

The CLI prints the message of any :class:`TrainingError` and exits with status 2.
"""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Base class of every error training or hit-rate evaluation reports to the user."""


class TrainingDataError(TrainingError):
    """A prompt file that is missing, unparseable or holds no usable prompt; an empty corpus."""


class UnsupportedModelError(TrainingError):
    """A model whose layers are not all full causal self-attention (Judge Q scores keys
    that every layer keeps; sliding-window, chunked, MLA and encoder-decoder models differ)."""


class CheckpointError(TrainingError):
    """A checkpoint that cannot be read or belongs to a run with other settings."""
