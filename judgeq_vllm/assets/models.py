"""Prepared model folders under ``<home>/models/``: built once from fetched assets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetMissingError
from .fetch import fetch_asset
from .registry import get_asset
from .store import find_problem, folder_lock, install_folder, models_root, report

# Written into every prepared model folder: where its files come from, in words.
PROVENANCE_NAME = "judgeq_asset.json"


@dataclass(frozen=True)
class PreparedModel:
    """A model folder built by this package.

    Attributes:
        folder_name: name of the folder under ``<home>/models``.
        target: the ``judgeq-vllm assets fetch`` target that builds it.
        recipe_version: bump it whenever the build changes, so old folders count as stale.
        source_assets: registry names of the assets the build reads.
        build: ``build(sources, out)`` fills the empty folder ``out``; ``sources`` maps
            each source asset name to its unpacked folder.
    """

    folder_name: str
    target: str
    recipe_version: int
    source_assets: tuple[str, ...]
    build: Callable[[dict[str, Path], Path], None]

    @property
    def folder(self) -> Path:
        return models_root() / self.folder_name

    def expected_marker(self) -> dict:
        return {
            "kind": "model",
            "recipe_version": self.recipe_version,
            "sources": {name: get_asset(name).sha256 for name in self.source_assets},
        }


def model_problem(model: PreparedModel, *, deep: bool = False) -> str | None:
    """Why the prepared folder of ``model`` is unusable, or None when it is complete."""
    return find_problem(model.folder, model.expected_marker(), deep=deep)


def prepared_model_path(model: PreparedModel) -> Path:
    """The prepared folder of ``model``; never builds or downloads.

    Raises:
        AssetMissingError: the folder is missing, incomplete or stale.
    """
    problem = model_problem(model)
    if problem is not None:
        raise AssetMissingError(model.target, problem)
    return model.folder


def prepare_model(model: PreparedModel, *, force: bool = False) -> Path:
    """Fetch the source assets of ``model`` and build its folder, unless already complete.

    Args:
        model: what to build.
        force: download the sources and rebuild even if complete copies exist.

    Returns:
        The prepared folder.
    """
    sources = {name: fetch_asset(name, force=force) for name in model.source_assets}
    with folder_lock(f"model-{model.folder_name}"):
        if not force and model_problem(model) is None:
            report(f"{model.folder_name}: already prepared at {model.folder}")
            return model.folder
        report(f"{model.folder_name}: preparing")
        record = dict(model.expected_marker(), name=model.folder_name)
        install_folder(model.folder, lambda out: model.build(sources, out), record)
    report(f"{model.folder_name}: ready at {model.folder}")
    return model.folder
