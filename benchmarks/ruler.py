"""RULER through the vLLM engine: each eviction policy at absolute budgets and kvpress
compression ratios, query-aware and query-agnostic, against full KV.

    python -m benchmarks.ruler --config smoke|smollm2 [--data FILE] [--prepare-only] ...

Samples come from RULER's own generators (``nvidia-long-context-eval``, all 13 tasks),
tokenized for the model, and are scored with RULER's metrics (``string_match_all``, and
``string_match_part`` for QA). Decoding is greedy. A nominal length ``L`` (4K, 8K) is
the engine's ``max_model_len``: RULER generates each sample to ``L`` minus what the chat
template, Judge Q's soft tokens and a small slack take (plus, for ``fwe``, the answer
RULER may overshoot by), so every request fits; lengths beyond the model's context are
refused.

The samples are written to (or read from) ``--data``, so that a machine without the
assets (the GPU host) can run from a file prepared here. Writes
``benchmarks/results/ruler/<config>-<device>-<date>.json`` with a markdown table (``.md``)
and one PNG per length next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import (
    add_engine_arguments,
    MODELS,
    N_SOFT,
    RESULTS_ROOT,
    VANILLA,
    budget_value,
    check_policies,
    default_enforce_eager,
    model_max_len,
    parse_budgets,
    parse_engine_args,
    progress,
    pyplot,
    result_header,
    result_stem,
    soft_tokens_for,
    split_list,
    write_json,
)
from .quality import (
    FULL_KV,
    PROTOCOLS,
    QualityEngine,
    chat_prompt,
    check_fits,
    engine_cells,
    load_or_build_samples,
    run_engine,
    template_overhead,
)

MODULE = "benchmarks.ruler"
# tokens kept free beyond the template and the soft tokens: the context/question split
# may tokenize a token or two differently from RULER's count of the whole input
LENGTH_SLACK = 8


@dataclasses.dataclass(frozen=True)
class RulerConfig:
    """One named configuration (each list has a CLI override).

    Attributes:
        seq_lens: nominal lengths (RULER's ``max_seq_length``, the engine's ``max_model_len``).
        num_samples: samples per task and length.
        budgets: absolute budgets, tokens kept per (layer, kv head).
        ratios: kvpress compression ratios, the fraction of the prompt's KV removed.
        kv_cache_memory_bytes: KV pool (``None``: vLLM's default share of GPU memory).
        answer_cap: at most this many new tokens per answer (``None``: RULER's own
            ``max_new_tokens`` per task); the CPU smoke run caps them to stay fast.
    """

    model: str
    dtype: str
    seq_lens: tuple[int, ...]
    tasks: tuple[str, ...]
    num_samples: int
    policies: tuple[str, ...]
    budgets: tuple[str, ...]
    ratios: tuple[str, ...]
    protocols: tuple[str, ...]
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_memory_bytes: int | None
    answer_cap: int | None = None


def _all_tasks() -> tuple[str, ...]:
    from judgeq_vllm.assets.ruler import TASKS

    return TASKS


CONFIGS: dict[str, RulerConfig] = {
    # CPU: one short task, one policy, one budget of each kind: checks the pipeline
    "smoke": RulerConfig(
        model="smollm2", dtype="float32", seq_lens=(1024,), tasks=("niah_single_1",), num_samples=2,
        policies=("snapkv",), budgets=("128",), ratios=("0.5",), protocols=PROTOCOLS,
        max_num_seqs=8, max_num_batched_tokens=1024, kv_cache_memory_bytes=512 * 2**20, answer_cap=16,
    ),
    # GPU host
    "smollm2": RulerConfig(
        model="smollm2", dtype="bfloat16", seq_lens=(4096, 8192), tasks=_all_tasks(), num_samples=50,
        policies=("judgeq", "snapkv", "streamingllm", "h2o", "knorm", "pyramidkv"), budgets=("128", "256", "512", "1024"),
        ratios=("0.25", "0.5", "0.75", "0.875"), protocols=PROTOCOLS,
        max_num_seqs=256, max_num_batched_tokens=16384, kv_cache_memory_bytes=None,
    ),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--tasks", help="comma-separated RULER tasks (default: the config's)")
    parser.add_argument("--seq-lens", help="comma-separated nominal lengths")
    parser.add_argument("--num-samples", type=int, help="samples per task and length")
    parser.add_argument("--policies", help="comma-separated policies")
    parser.add_argument("--budgets", help="comma-separated absolute budgets (tokens)")
    parser.add_argument("--ratios", help="comma-separated compression ratios")
    parser.add_argument("--protocols", help=f"comma-separated, of: {', '.join(PROTOCOLS)}")
    parser.add_argument("--data", type=Path, help="samples file (.json.gz): read if it exists, else generated and written")
    parser.add_argument("--prepare-only", action="store_true", help="write the samples file and stop")
    parser.add_argument("--seed", type=int, default=42, help="RULER's random_seed")
    add_engine_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT / "ruler")
    return parser.parse_args(argv)


def resolved_config(args: argparse.Namespace) -> RulerConfig:
    config = CONFIGS[args.config]
    overrides = {
        "tasks": tuple(split_list(args.tasks)) if args.tasks else None,
        "seq_lens": tuple(int(item) for item in split_list(args.seq_lens)) if args.seq_lens else None,
        "num_samples": args.num_samples,
        "policies": tuple(check_policies(split_list(args.policies))) if args.policies is not None else None,
        "budgets": tuple(split_list(args.budgets)) if args.budgets is not None else None,
        "ratios": tuple(split_list(args.ratios)) if args.ratios is not None else None,
        "protocols": tuple(split_list(args.protocols)) if args.protocols else None,
    }
    config = dataclasses.replace(config, **{key: value for key, value in overrides.items() if value is not None})
    unknown = sorted(set(config.protocols) - set(PROTOCOLS))
    if unknown:
        raise SystemExit(f"unknown protocol {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    if config.policies and not config.budgets + config.ratios:
        raise SystemExit("give at least one budget or ratio for the policies")
    return config


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = resolved_config(args)
    spec = MODELS[config.model]
    model_dir = Path(args.model_dir or spec.default_path())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    allowed = [length for length in config.seq_lens if length <= model_max_len(model_dir)]
    if allowed != list(config.seq_lens):
        print(f"skipping lengths beyond the model's context ({model_max_len(model_dir)}): "
              f"{sorted(set(config.seq_lens) - set(allowed))}", file=sys.stderr)
        config = dataclasses.replace(config, seq_lens=tuple(allowed))
    data_path = args.data or default_data_path(config, args.seed)
    data = load_or_build_samples(data_path, lambda: build_samples(config, model_dir, tokenizer, args.seed))
    print(f"RULER samples: {data_path}", file=sys.stderr)
    check_data(data, config)
    # checked here too, so that a samples file prepared for the GPU host is known to fit
    groups = prompt_groups(config, tokenizer, data)
    if args.prepare_only:
        return None
    header = result_header("ruler", args.config, args.tag, MODULE, argv)
    stem = result_stem(header)
    with tempfile.TemporaryDirectory(prefix="judgeq-bench-") as scratch:
        engine = QualityEngine(
            model_dir=model_dir, dtype=config.dtype, max_model_len=max(config.seq_lens),
            soft_tokens=soft_tokens_for(spec, model_dir, args.soft_tokens, Path(scratch))[0],
            enforce_eager=default_enforce_eager() if args.enforce_eager is None else args.enforce_eager,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes, extra_engine_args=parse_engine_args(args.engine_arg),
        )
        results = evaluate(config, engine, groups)
    report = {
        **header,
        "model": {"key": config.model, "description": spec.description, "path": str(model_dir), "dtype": config.dtype},
        "engine": engine.describe(),
        "data": {
            "path": str(data_path), "seed": args.seed, "num_samples": config.num_samples, "answer_cap": config.answer_cap,
            "generator_seq_lens": {str(n): data["seq_lens"][str(n)]["generator_seq_len"] for n in config.seq_lens},
        },
        "tasks": list(config.tasks), "seq_lens": list(config.seq_lens), "protocols": list(config.protocols),
        "budgets": [budget_value(b) for b in parse_budgets(",".join(config.budgets))],
        "ratios": [budget_value(b) for b in parse_budgets(",".join(config.ratios))],
        "notes": NOTES,
        "results": results,
    }
    report["plots"] = write_plots(report, args.out, stem)
    (args.out / f"{stem}.md").write_text(markdown_tables(report))
    path = write_json(args.out / f"{stem}.json", report)
    print(markdown_summary(report))
    print(f"wrote {path}")
    return path


NOTES = (
    "score: RULER's metric per task in [0, 100] (string_match_all; string_match_part for qa_1/qa_2), averaged "
    "over samples; average: the mean over tasks. protocol: query_aware evicts after the whole prompt; "
    "query_agnostic evicts only the context (kv_compress_prefix), the question is prefilled after it; full: "
    "vanilla vLLM, no eviction. eviction: the engine's counters for the cell's requests."
)


def default_data_path(config: RulerConfig, seed: int) -> Path:
    from judgeq_vllm.assets.store import judgeq_home

    key = hashlib.sha256(repr((config.tasks, config.seq_lens, config.num_samples, seed)).encode()).hexdigest()[:10]
    return judgeq_home() / "benchmarks" / f"ruler-{config.model}-{key}.json.gz"


def generator_seq_len(nominal: int, task: str, overhead: int) -> int:
    """The length RULER generates to, so that the templated prompt, Judge Q's soft tokens
    and the answer fit ``nominal`` (RULER's ``fwe`` may overshoot by its answer length)."""
    from judgeq_vllm.assets.ruler import task_spec

    overshoot = task_spec(task)["max_new_tokens"] if task == "fwe" else 0
    return nominal - overhead - N_SOFT - LENGTH_SLACK - overshoot


def build_samples(config: RulerConfig, model_dir: Path, tokenizer, seed: int) -> dict[str, Any]:
    from judgeq_vllm.assets.ruler import generate_samples

    overhead = template_overhead(tokenizer)
    data = {"model": config.model, "tokenizer": str(model_dir), "template_overhead": overhead, "seq_lens": {}}
    for nominal in config.seq_lens:
        samples, lengths = [], {}
        for task in progress(config.tasks, desc=f"RULER samples {nominal}", unit="task"):
            lengths[task] = generator_seq_len(nominal, task, overhead)
            samples += generate_samples(task, lengths[task], str(model_dir), config.num_samples, seed)
        data["seq_lens"][str(nominal)] = {"generator_seq_len": lengths, "samples": samples}
    return data


def check_data(data: dict[str, Any], config: RulerConfig) -> None:
    """The samples file holds what the configuration asks for."""
    for nominal in config.seq_lens:
        entry = data["seq_lens"].get(str(nominal))
        if entry is None:
            raise SystemExit(f"the samples file has no length {nominal} (it has {', '.join(data['seq_lens'])})")
        counts = {task: sum(sample["task"] == task for sample in entry["samples"]) for task in config.tasks}
        short = {task: count for task, count in counts.items() if count < config.num_samples}
        if short:
            raise SystemExit(f"the samples file has too few samples at length {nominal}: {short}")


def prompt_groups(config: RulerConfig, tokenizer, data: dict[str, Any]) -> dict[int, tuple[list, list[dict]]]:
    """Per nominal length, the samples to evaluate and their chat prompts; every prompt,
    with Judge Q's soft tokens and its answer, fits the length."""
    groups = {}
    for nominal in config.seq_lens:
        samples = [s for s in data["seq_lens"][str(nominal)]["samples"] if s["task"] in config.tasks]
        samples = [_capped(sample, config.answer_cap) for sample in _first_per_task(samples, config.num_samples)]
        prompts = [chat_prompt(tokenizer, sample) for sample in samples]
        check_fits(prompts, samples, nominal)
        groups[nominal] = (prompts, samples)
    return groups


def evaluate(config: RulerConfig, engine: QualityEngine, groups: dict[int, tuple[list, list[dict]]]) -> list[dict[str, Any]]:
    """Every engine (vanilla, then each policy) over every length; one result per
    (setting, protocol, length) with the per-task scores."""
    from judgeq_vllm.assets.ruler import score_sample

    budgets = parse_budgets(",".join(config.budgets + config.ratios))
    engines = [None, *config.policies]
    total = sum(len(engine_cells(policy, budgets, list(config.protocols))) for policy in engines) * len(groups)
    results = []
    with progress(total=total, desc="RULER cells", unit="cell") as bar:
        for policy in engines:
            cells = run_engine(engine, policy, budgets, list(config.protocols), groups,
                               lambda sample, prediction: score_sample(sample["task"], prediction, sample["outputs"]), bar)
            results += [summarize_cell(cell, groups[cell["group"]][1], config.tasks) for cell in cells]
    return results


def _first_per_task(samples: list[dict], num_samples: int) -> list[dict]:
    kept, seen = [], {}
    for sample in samples:
        seen[sample["task"]] = seen.get(sample["task"], 0) + 1
        if seen[sample["task"]] <= num_samples:
            kept.append(sample)
    return kept


def _capped(sample: dict, answer_cap: int | None) -> dict:
    if answer_cap is None:
        return sample
    return sample | {"max_new_tokens": min(sample["max_new_tokens"], answer_cap)}


def summarize_cell(cell: dict[str, Any], samples: list[dict], tasks: tuple[str, ...]) -> dict[str, Any]:
    """Per-task mean scores (RULER rounds to 2 decimals) and their average."""
    scores = {}
    for task in tasks:
        task_scores = [score for score, sample in zip(cell["scores"], samples, strict=True) if sample["task"] == task]
        scores[task] = round(sum(task_scores) / len(task_scores), 2)
    return {
        key: cell[key] for key in ("setting", "policy", "budget", "protocol", "eviction")
    } | {"seq_len": cell["group"], "scores": scores, "average": round(sum(scores.values()) / len(scores), 2)}


# --- tables and plots --------------------------------------------------------------


def markdown_tables(report: dict) -> str:
    """Per length and protocol: one row per setting, one column per task, the average last."""
    lines = [f"# RULER: {report['model']['description']}", "",
             f"Device: {report['device']}; vLLM {report['vllm']}; commit {report['git_commit']}; `{report['command']}`", ""]
    tasks = report["tasks"]
    for seq_len in report["seq_lens"]:
        for protocol in report["protocols"]:
            rows = [r for r in report["results"] if r["seq_len"] == seq_len and r["protocol"] in (protocol, FULL_KV)]
            lines += [f"## {seq_len} tokens, {protocol}", "", "| setting | " + " | ".join(tasks) + " | average |",
                      "|---|" + "---:|" * (len(tasks) + 1)]
            for row in rows:
                cells = " | ".join(f"{row['scores'][task]:.1f}" for task in tasks)
                name = "full KV" if row["policy"] == VANILLA else row["setting"]
                lines.append(f"| {name} | {cells} | **{row['average']:.1f}** |")
            lines.append("")
    return "\n".join(lines)


def markdown_summary(report: dict) -> str:
    """Average score per policy (rows) and budget (columns), per length and protocol."""
    lines = []
    budgets = report["budgets"] + report["ratios"]
    for seq_len in report["seq_lens"]:
        for protocol in report["protocols"]:
            rows = [r for r in report["results"] if r["seq_len"] == seq_len]
            full = next(r["average"] for r in rows if r["policy"] == VANILLA)
            lines += [f"RULER average, {seq_len} tokens, {protocol} (full KV {full:.1f})", "",
                      "| policy | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
            for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != VANILLA):
                by_budget = {r["budget"]: r["average"] for r in rows if r["policy"] == policy and r["protocol"] == protocol}
                lines.append(f"| {policy} | " + " | ".join(f"{by_budget[b]:.1f}" for b in budgets) + " |")
            lines.append("")
    return "\n".join(lines)


def write_plots(report: dict, out_dir: Path, stem: str) -> list[str]:
    """One PNG per length: average score vs budget, a row per protocol, token budgets on
    the left and compression ratios on the right; full KV dashed."""
    plt = pyplot()
    written = []
    protocols = report["protocols"]
    for seq_len in report["seq_lens"]:
        rows = [r for r in report["results"] if r["seq_len"] == seq_len]
        full = next(r["average"] for r in rows if r["policy"] == VANILLA)
        fig, axes = plt.subplots(len(protocols), 2, figsize=(11, 4 * len(protocols)), squeeze=False)
        for row_axes, protocol in zip(axes, protocols):
            for ax, budgets, xlabel in ((row_axes[0], report["budgets"], "KV budget (tokens per head)"),
                                        (row_axes[1], report["ratios"], "compression ratio (fraction removed)")):
                _plot_scores(ax, rows, protocol, budgets, full)
                ax.set_xlabel(xlabel)
                ax.set_title(f"{protocol}", fontsize=9)
        fig.suptitle(f"RULER average, {seq_len} tokens: {report['model']['key']} {report['model']['dtype']}, {report['device']}",
                     fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{stem}-{seq_len}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def _plot_scores(ax, rows: list[dict], protocol: str, budgets: list, full: float) -> None:
    for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != VANILLA):
        by_budget = {r["budget"]: r["average"] for r in rows if r["policy"] == policy and r["protocol"] == protocol}
        ax.plot(range(len(budgets)), [by_budget[b] for b in budgets], marker="o", label=policy)
    ax.axhline(full, color="black", linestyle="--", label="full KV")
    ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
    ax.set_ylim(0, 100)
    ax.set_ylabel("average score")
    ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
