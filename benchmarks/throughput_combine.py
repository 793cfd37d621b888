"""Offline throughput runs split across calls (one KV pool per call), joined into one result file.

    python -m benchmarks.throughput_combine --tag TAG [--out DIR] FILE...

The GPU host's 10-minute calls fit one KV pool of an 8B-shape offline run at a time, so a
pool sweep comes back as one ``benchmarks.throughput`` file per pool. This joins such
files into one of the same schema (``<config>-<tag>-<device>-<date>.json``, its plots and
tables), so that tok/s vs KV pool spans every run. Every row keeps the ``speed_ratio`` its
own run gave it (against the vanilla measured in that run on the same pool); ``sources``
records the files joined, and ``benchmarks.report`` shows the joined file in their place.

The inputs must be offline runs of one configuration, device, vLLM, model, workload and
engine; each (policy, budget, pool) may come from one of them only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from .common import VANILLA, command_line, result_stem, write_json
from .throughput import format_tables, write_plots

MODULE = "benchmarks.throughput_combine"
# rows of runs that differ in any of these would not measure the same thing
SHARED_FIELDS = ("config", "device", "vllm", "model", "workload", "engine", "kv_bytes_per_token")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="offline result files of benchmarks.throughput")
    parser.add_argument("--tag", required=True, help="names the joined file apart from its inputs")
    parser.add_argument("--out", type=Path, help="output folder (default: the first input's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    runs = [(path, json.loads(path.read_text())) for path in args.files]
    check_joinable(runs)
    report = combined_report(runs, args.tag, command_line(MODULE, argv))
    out_dir = args.out or args.files[0].parent
    stem = result_stem(report)
    path = out_dir / f"{stem}.json"
    if any(path.resolve() == source.resolve() for source in args.files):
        raise SystemExit(f"{path} is one of the inputs: give the joined file a --tag of its own")
    report["plots"] = write_plots(report, out_dir, stem)
    write_json(path, report)
    print(format_tables(report))
    print(f"wrote {path}")
    return path


def check_joinable(runs: list[tuple[Path, dict[str, Any]]]) -> None:
    """Raises ``SystemExit`` naming the first reason the runs cannot make one file."""
    for path, report in runs:
        if report.get("kind") != "throughput":
            raise SystemExit(f"{path.name} is a {report.get('kind')!r} result, not a throughput one")
        if report["online"]:
            # online ratios are per request rate on one pool: a pool sweep has none to join
            raise SystemExit(f"{path.name} has online rows: only offline runs (--modes offline) can be joined")
    first_path, first = runs[0]
    for field in SHARED_FIELDS:
        for path, report in runs[1:]:
            if report.get(field) != first.get(field):
                raise SystemExit(
                    f"the inputs differ in {field}: {first.get(field)!r} ({first_path.name}) "
                    f"vs {report.get(field)!r} ({path.name})"
                )
    check_each_setting_once(runs)


def check_each_setting_once(runs: list[tuple[Path, dict[str, Any]]]) -> None:
    """A (policy, budget, pool) measured twice would leave the joined table two answers."""
    seen: dict[tuple, Path] = {}
    for path, report in runs:
        for row in report["offline"]:
            key = (row["policy"], row["budget"], row["pool_tokens"])
            if key in seen:
                raise SystemExit(
                    f"{row['setting']} on KV pool {row['pool_tokens']} tokens is in both {seen[key].name} and "
                    f"{path.name}: leave one of them out"
                )
            seen[key] = path


def combined_report(runs: list[tuple[Path, dict[str, Any]]], tag: str, command: str) -> dict[str, Any]:
    """The joined result, fields in ``benchmarks.throughput``'s order (``plots`` comes last)."""
    reports = [report for _, report in runs]
    first = reports[0]
    return {
        **{field: first[field] for field in ("device", "torch", "triton", "cuda", "vllm")},
        "git_commit": "+".join(dict.fromkeys(report["git_commit"] or "unknown" for report in reports)),
        "command": command,
        "date": max((report["date"] for report in reports), key=datetime.datetime.fromisoformat),
        "kind": first["kind"],
        "config": first["config"],
        "tag": tag,
        **{field: first[field] for field in ("model", "workload", "engine", "kv_bytes_per_token")},
        "reference": {"pool_tokens": first["reference"]["pool_tokens"], "budget": first["reference"]["budget"]},
        **{field: first[field] for field in ("request_rates", "notes", "soft_tokens")},
        "offline": joined_rows(reports),
        "online": [],
        "online_servers": [],
        "sources": [
            {"file": path.name, "git_commit": report["git_commit"], "date": report["date"], "command": report["command"]}
            for path, report in runs
        ],
    }


def joined_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every offline row by pool, vanilla (each ratio's baseline) first, then in the inputs' order."""
    rows = [row for report in reports for row in report["offline"]]
    # sorted() is stable: rows that tie keep the inputs' order
    return sorted(rows, key=lambda row: (row["pool_tokens"], row["policy"] != VANILLA))


if __name__ == "__main__":
    main()
