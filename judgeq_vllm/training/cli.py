"""``judgeq-vllm train``, ``judgeq-vllm hit-rate`` and ``judgeq-vllm corpus``.

``judgeq_vllm/cli.py`` calls :func:`add_parsers`; each command returns its exit code:
0 on success, 2 with a one-line ``error: ...`` for a user error (bad data, unsupported
model, foreign artifact or checkpoint, missing asset). Heavy imports happen inside the
commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from .corpus import CorpusSpec
from .config import TrainConfig

_DEFAULTS = TrainConfig()
_CORPUS = CorpusSpec()


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``train``, ``hit-rate`` and ``corpus`` to a ``judgeq-vllm`` parser."""
    train = subparsers.add_parser(
        "train", help="train Judge Q soft tokens for a model (writes a soft-token artifact)",
        description="Trains n_soft soft-token embeddings so that their attention over a prompt matches "
                    "the attention of the model's own response (Judge Q). Only the soft tokens train; "
                    "the model is checked to be bit-identical afterwards.",
    )
    _model_arguments(train)
    train.add_argument("--data", help="JSON/JSONL prompt file (default: the built-in corpus, train split; "
                                      "a file with split labels contributes its 'train' records)")
    train.add_argument("--out", required=True, help="the soft-token artifact to write (.safetensors)")
    train.add_argument("--model-name", help="model name stored in the artifact (default: the model folder's name)")
    train.add_argument("--n-soft", type=int, default=_DEFAULTS.n_soft, help="number of soft tokens")
    train.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="prompts per step")
    train.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak Adam learning rate")
    train.add_argument("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps, help="linear warm-up steps")
    train.add_argument("--final-lr-ratio", type=float, default=_DEFAULTS.final_lr_ratio,
                       help="learning rate at the last step, relative to --lr (cosine decay)")
    train.add_argument("--max-prompt-tokens", type=int, default=_DEFAULTS.max_prompt_tokens,
                       help="longer prompts are cut in the middle")
    train.add_argument("--max-new-tokens", type=int, default=_DEFAULTS.max_new_tokens,
                       help="length limit of the model's own responses (the targets)")
    train.add_argument("--renormalize", action="store_true",
                       help="renormalise attention rows over the prompt positions (default: the model's "
                            "softmax rows restricted to the prompt)")
    train.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="initialisation and sample order")
    train.add_argument("--max-prompts", type=int, help="use only the first N training prompts")
    train.add_argument("--checkpoint", help="checkpoint file (default: OUT.ckpt)")
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint if there is one")
    train.add_argument("--max-run-steps", type=int,
                       help="stop this invocation after N steps (checkpoint + partial artifact; rerun with --resume)")
    train.add_argument("--max-run-minutes", type=float,
                       help="stop this invocation after M minutes of training (checkpoint + partial artifact)")
    train.set_defaults(func=_reporting_errors(run_train))

    hit_rate = subparsers.add_parser(
        "hit-rate", help="how much of the response's top-k attention Judge Q and SnapKV keep (JSON, PNG)",
        description="On held-out prompts, the overlap between each policy's kept set and the top-k prompt "
                    "positions of the model's own response's attention, per (layer, kv head), at each budget.",
    )
    _model_arguments(hit_rate)
    hit_rate.add_argument("--soft-tokens", required=True, help="the trained soft-token artifact")
    hit_rate.add_argument("--data", help="JSON/JSONL prompt file (default: the built-in corpus, held-out split; "
                                         "a file with split labels contributes its 'heldout' records)")
    hit_rate.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512], help="KV budgets (tokens per head)")
    hit_rate.add_argument("--max-prompts", type=int, default=64, help="evaluate the first N prompts")
    hit_rate.add_argument("--max-prompt-tokens", type=int, default=_DEFAULTS.max_prompt_tokens,
                          help="longer prompts are cut in the middle")
    hit_rate.add_argument("--max-new-tokens", type=int,
                          help="response length limit (default: the artifact's training setting)")
    hit_rate.add_argument("--no-untrained", action="store_true",
                          help="skip the control: Judge Q with the run's untrained initial soft tokens")
    hit_rate.add_argument("--out", required=True, help="results JSON to write")
    hit_rate.add_argument("--plot", help="also write a bar chart PNG here (needs matplotlib)")
    hit_rate.set_defaults(func=_reporting_errors(run_hit_rate))

    corpus = subparsers.add_parser(
        "corpus", help="write the built-in training corpus (train + held-out prompts) to a JSONL file",
        description="The built-in corpus is made from the offline Shakespeare and chit-chat assets; export it "
                    "to carry it to a machine without them, then pass it to train/hit-rate with --data.",
    )
    corpus.add_argument("--out", required=True, help="JSONL file to write (gzip-compressed if it ends in .gz)")
    corpus.add_argument("--n-train", type=int, default=_CORPUS.n_train, help="training prompts")
    corpus.add_argument("--n-heldout", type=int, default=_CORPUS.n_heldout, help="held-out prompts")
    corpus.add_argument("--min-chars", type=int, default=_CORPUS.min_chars, help="shortest passage, characters")
    corpus.add_argument("--max-chars", type=int, default=_CORPUS.max_chars, help="longest passage, characters")
    corpus.add_argument("--seed", type=int, default=_CORPUS.seed)
    corpus.set_defaults(func=_reporting_errors(run_corpus))


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model folder or name (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model weights (auto: bfloat16 on a GPU, float32 on the CPU); the soft tokens "
                             "and the loss stay float32")
    parser.add_argument("--cache-dir", help="where the model's responses are cached "
                                            "(default: $JUDGEQ_HOME/training/responses)")
    parser.add_argument("--gen-batch-size", type=int, default=16, help="prompts per response-generation batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _reporting_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turns the user errors of ``command`` into ``error: ...`` on stderr and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from ..assets.errors import AssetError
        from ..soft_tokens import SoftTokenArtifactError
        from .errors import TrainingError

        try:
            return command(args)
        except (TrainingError, SoftTokenArtifactError, AssetError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return run


def _load_model(args: argparse.Namespace):
    from transformers import AutoTokenizer

    from .model import load_training_model, resolve_device, resolve_dtype, resolve_model_path

    path = resolve_model_path(args.model)
    device = resolve_device(args.device)
    model = load_training_model(path, device, resolve_dtype(args.dtype, device))
    return path, model, AutoTokenizer.from_pretrained(path)


def _cache_dir(args: argparse.Namespace) -> Path:
    from ..assets.store import judgeq_home

    return Path(args.cache_dir) if args.cache_dir else judgeq_home() / "training" / "responses"


def _records(data: str | None, split: str, max_prompts: int | None):
    """Prompt records of ``split`` from the file, or from the built-in corpus; and a label."""
    from .data import load_prompt_file, select_split
    from .errors import TrainingDataError

    if data is not None:
        records, label = select_split(load_prompt_file(data), split), f"{data} ({split} split if labelled)"
    else:
        from .corpus import default_corpus

        records = [record for record in default_corpus(_CORPUS) if record.split == split]
        label = f"built-in corpus {split} split ({_CORPUS})"
    if max_prompts is not None:
        records = records[:max_prompts]
    if not records:
        raise TrainingDataError(f"no {split} prompt to use (check --data and --max-prompts)")
    return records, label


def run_train(args: argparse.Namespace) -> int:
    from .errors import TrainingError
    from .trainer import RunLimits, build_samples, train_soft_tokens

    try:
        config = TrainConfig(
            n_soft=args.n_soft, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            warmup_steps=args.warmup_steps, final_lr_ratio=args.final_lr_ratio,
            max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
            renormalize=args.renormalize, seed=args.seed,
        )
    except ValueError as exc:
        raise TrainingError(f"invalid training settings: {exc}") from exc
    records, label = _records(args.data, "train", args.max_prompts)
    path, model, tokenizer = _load_model(args)
    model_name = args.model_name or Path(path).name
    samples, empty = build_samples(
        model, tokenizer, records, config.max_prompt_tokens, config.max_new_tokens,
        _cache_dir(args), args.gen_batch_size, not args.no_progress,
    )
    checkpoint = args.checkpoint or f"{args.out}.ckpt"
    limits = RunLimits(args.max_run_steps, None if args.max_run_minutes is None else args.max_run_minutes * 60)
    result = train_soft_tokens(
        model, samples, config, model_name,
        checkpoint_path=checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume, limits=limits,
        summary={"data": label, "n_prompts": len(records), "n_empty_responses": empty, "model_path": path},
        show_progress=not args.no_progress,
    )
    result.soft_tokens.save(args.out)
    training = result.soft_tokens.training
    print(f"wrote {args.out}: {config.n_soft} soft tokens for {model_name}, {training['steps_done']}/{config.steps} "
          f"steps on {len(samples)} prompts, loss {training['loss_first']:.4e} -> {training['loss_last']:.4e}")
    if not result.complete:
        print(f"stopped early; the run continues from {checkpoint} when this command is rerun with --resume")
    return 0


def run_hit_rate(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from ..soft_tokens import SoftTokens, hf_model_fingerprint, init_soft_tokens
    from .errors import TrainingError
    from .hit_rate import evaluate_hit_rates, hit_rate_policies, plot_hit_rates
    from .trainer import build_samples

    if min(args.budgets) < 1:
        raise TrainingError(f"budgets must be >= 1 token, got {args.budgets}")
    artifact = SoftTokens.load(args.soft_tokens)
    records, label = _records(args.data, "heldout", args.max_prompts)
    path, model, tokenizer = _load_model(args)
    artifact.check_model(path, hf_model_fingerprint(model))
    trained_config = artifact.training.get("config", {})
    max_new_tokens = args.max_new_tokens or trained_config.get("max_new_tokens", _DEFAULTS.max_new_tokens)
    samples, empty = build_samples(
        model, tokenizer, records, args.max_prompt_tokens, max_new_tokens,
        _cache_dir(args), args.gen_batch_size, not args.no_progress,
    )
    untrained = None
    if not args.no_untrained:
        seed = artifact.training.get("init_seed", artifact.training.get("seed", 0))
        untrained = init_soft_tokens(model, artifact.base_model, artifact.num_tokens, seed)
    policies = hit_rate_policies(artifact, untrained)
    results = evaluate_hit_rates(model, samples, policies, sorted(set(args.budgets)), not args.no_progress)
    lengths = [len(sample.prompt_ids) for sample in samples]
    report = {
        "model": artifact.base_model,
        "model_path": path,
        "model_fingerprint": artifact.model_fingerprint,
        "soft_tokens": args.soft_tokens,
        "soft_tokens_training": {
            name: artifact.training.get(name) for name in ("trained", "complete", "steps_done", "loss_first", "loss_last", "config")
        },
        "data": label,
        "n_prompts": len(samples),
        "n_empty_responses": empty,
        "prompt_tokens": {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
        "max_new_tokens": max_new_tokens,
        "policies": {name: repr(policy) for name, policy in policies.items()},
        "reference": "per (layer, kv head): top-k prompt positions of the model's own response's attention, "
                     "softmax rows summed over the response tokens and the GQA group's query heads, no pooling",
        "hit_rate": "|kept & reference| / k, mean over layers, kv heads and the prompts longer than k",
        "budgets": results,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    names = list(policies)
    print(f"{'budget':>8} {'prompts':>8} " + " ".join(f"{name:>17}" for name in names))
    for budget, row in results.items():
        cells = " ".join(f"{'-' if row[name] is None else format(row[name], '.3f'):>17}" for name in names)
        print(f"{budget:>8} {row['n_prompts']:>8} {cells}")
    plot = args.plot
    if plot:
        try:
            plot_hit_rates(results, f"{artifact.base_model}: hit rate on {len(samples)} held-out prompts", plot)
        except ImportError:  # the GPU host may lack matplotlib; the JSON is what matters
            print("warning: matplotlib is not installed, no plot written", file=sys.stderr)
            plot = None
    print(f"wrote {args.out}" + (f" and {plot}" if plot else ""))
    return 0


def run_corpus(args: argparse.Namespace) -> int:
    from .corpus import default_corpus
    from .data import write_prompt_file
    from .errors import TrainingError

    try:
        spec = CorpusSpec(args.n_train, args.n_heldout, args.min_chars, args.max_chars, args.seed)
    except ValueError as exc:
        raise TrainingError(f"invalid corpus settings: {exc}") from exc
    size = write_prompt_file(default_corpus(spec), args.out)
    print(f"wrote {args.out}: {spec.n_train} train + {spec.n_heldout} held-out prompts, {size / 1e6:.1f} MB")
    return 0
