"""The ``judgeq-vllm`` command: ``assets``, ``demo``, ``train``, ``hit-rate``, ``corpus``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .assets.cli import add_parser as add_assets_parser
    from .demo import add_parser as add_demo_parser
    from .training.cli import add_parsers as add_training_parsers

    parser = argparse.ArgumentParser(
        prog="judgeq-vllm",
        description="KV-cache eviction (Judge Q and baselines) for vLLM 0.26.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_assets_parser(subparsers)
    add_demo_parser(subparsers)
    add_training_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
