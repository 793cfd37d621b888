"""Training Judge Q's soft tokens, and measuring how well they pick the keys to keep.

Modules: ``data`` (prompt files), ``corpus`` (the built-in Shakespeare + chit-chat
corpus and its held-out split), ``responses`` (the model's own greedy responses, cached),
``forward`` and ``attention_maps`` (captured queries/keys, attention over the prompt, the
loss), ``trainer`` (the training loop and checkpoints), ``hit_rate`` (the evaluation),
``model`` (model checks and loading), ``cli`` (``judgeq-vllm train``, ``hit-rate``,
``corpus``). Only the light modules are re-exported here, so that the CLI starts fast;
import the others from their module.
"""

from .config import TrainConfig
from .corpus import CorpusSpec, default_corpus
from .data import PromptRecord, load_prompt_file, select_split, write_prompt_file
from .errors import CheckpointError, TrainingDataError, TrainingError, UnsupportedModelError

__all__ = [
    "CheckpointError",
    "CorpusSpec",
    "PromptRecord",
    "TrainConfig",
    "TrainingDataError",
    "TrainingError",
    "UnsupportedModelError",
    "default_corpus",
    "load_prompt_file",
    "select_split",
    "write_prompt_file",
]
