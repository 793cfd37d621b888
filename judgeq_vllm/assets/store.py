"""On-disk layout of the per-machine asset cache, completion markers, atomic installs.

Layout under ``judgeq_home()``::

    assets/<asset name>/      an unpacked distribution (registry.ASSETS)
    models/<ModelName>/       a prepared model folder (HF layout)
    .locks/<name>.lock        serialises two processes preparing the same folder

A folder counts as present only when its ``.complete.json`` marker exists, parses, matches
what the code expects (pinned sha256, recipe version) and lists files that are all there
with their recorded sizes. The marker is written inside a temporary folder that is then
renamed into place, so an interrupted fetch never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

MARKER_NAME = ".complete.json"
_HASH_BLOCK = 1 << 20


def judgeq_home() -> Path:
    """The per-machine cache root: ``$JUDGEQ_HOME`` or ``~/.cache/judgeq-vllm``."""
    configured = os.environ.get("JUDGEQ_HOME")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "judgeq-vllm"


def assets_root() -> Path:
    return judgeq_home() / "assets"


def models_root() -> Path:
    return judgeq_home() / "models"


def report(message: str) -> None:
    """One progress line per step, on stderr so that stdout stays parseable."""
    print(f"[judgeq-vllm assets] {message}", file=sys.stderr, flush=True)


def sha256_of_file(path: Path, *, progress: bool = False) -> str:
    """Hex sha256 of a file; ``progress`` shows a byte bar (for the large downloads)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
        disable=not progress, file=sys.stderr,
    ) as bar:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER_NAME)


def build_manifest(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``folder``, keyed by POSIX relative path."""
    return {
        path.relative_to(folder).as_posix(): {
            "size": path.stat().st_size,
            "sha256": sha256_of_file(path),
        }
        for path in _files_under(folder)
    }


def write_marker(folder: Path, record: dict) -> None:
    """Write the completion marker: ``record`` plus creation date and file manifest."""
    marker = dict(record)
    marker["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    marker["files"] = build_manifest(folder)
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def read_marker(folder: Path) -> dict | None:
    """The parsed marker of ``folder``, or None when it is absent or unreadable."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def find_problem(folder: Path, expected: dict, *, deep: bool = False) -> str | None:
    """Why ``folder`` is not a complete copy, or None when it is.

    Args:
        folder: the asset or model folder.
        expected: marker fields that must hold these exact values (e.g. the pinned
            sha256 or the recipe version), so a registry change invalidates old copies.
        deep: also re-hash every file (``assets verify``); otherwise sizes only, which is
            cheap enough to run on every access.

    Returns:
        A short description of the first problem found, or None.
    """
    if not folder.is_dir():
        return f"{folder} does not exist"
    marker = read_marker(folder)
    if marker is None:
        return f"{folder} has no readable {MARKER_NAME} (interrupted or damaged fetch)"
    for key, value in expected.items():
        if marker.get(key) != value:
            return f"{folder} was made for {key}={marker.get(key)!r}, this code needs {value!r}"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return f"{folder}/{MARKER_NAME} lists no files"
    for relpath, info in files.items():
        path = folder / relpath
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != info.get("size"):
            return f"{path} has the wrong size"
        if deep and sha256_of_file(path) != info.get("sha256"):
            return f"{path} has the wrong sha256"
    return None


@contextlib.contextmanager
def folder_lock(name: str) -> Iterator[None]:
    """Hold an exclusive per-name lock, so parallel processes (pytest-xdist, two shells)
    prepare a folder once instead of racing on the same rename."""
    lock_dir = judgeq_home() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_leftovers(parent: Path, prefix: str) -> None:
    """Delete temporary folders named ``prefix*`` left by a killed fetch or build."""
    for leftover in parent.glob(f"{prefix}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _make_readable_by_all(folder: Path) -> None:
    """The cache is per machine, not per user: undo mkdtemp's (and some writers') 0700/0600."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def install_folder(target: Path, build: Callable[[Path], None], record: dict) -> Path:
    """Build a folder in a temporary sibling, mark it complete, then rename it to ``target``.

    The caller holds ``folder_lock`` for ``target``, so leftovers of an interrupted
    earlier build can be removed safely.

    Args:
        target: final folder; a previous (damaged or stale) copy is replaced.
        build: fills the empty temporary folder it is given.
        record: marker fields (see ``write_marker``).

    Returns:
        ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent, f".tmp-{target.name}-")
    # A sibling on the same filesystem, so that the final rename is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        build(staging)
        write_marker(staging, record)
        _make_readable_by_all(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
