"""``judgeq-vllm demo``: a needle in a haystack, answered with every policy's compressed KV.

Serves the embedded default model (SmolLM2-135M-Instruct, real weights from the offline
assets) through vLLM with each eviction policy: prefill a ~1.5K-token prompt (the 135M model still finds the needle there with full KV), evict down
to the budget inside the engine, decode greedily, and report what each request kept and
how many KV blocks the engine returned to its pool, next to the full-KV answer.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from .policies import POLICIES, KVBudget, make_policy

NEEDLE = "The secret ingredient of the lighthouse keeper's soup is smoked paprika."
QUESTION = "What is the secret ingredient of the lighthouse keeper's soup? Answer in one sentence."
NEEDLE_ANSWER = "paprika"
# where `judgeq-vllm train` puts the artifact for the embedded model (issue: training)
DEFAULT_ARTIFACT = Path(__file__).parent / "data" / "SmolLM2-135M-Instruct.judgeq.safetensors"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="needle-in-a-haystack with each eviction policy on the default model")
    parser.add_argument("--budget", default="256", help="KV budget: tokens per head (e.g. 256) or ratio (e.g. 0.875)")
    parser.add_argument("--policies", default=",".join(sorted(POLICIES)), help="comma-separated policy names")
    parser.add_argument("--context-tokens", type=int, default=1500, help="haystack length in tokens")
    parser.add_argument("--depth", type=float, default=0.4, help="needle depth in the haystack, 0..1")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--soft-tokens", default=None, help="Judge Q artifact (default: the embedded one if trained)")
    parser.set_defaults(func=run_demo)


def build_haystack_prompt(tokenizer, context_tokens: int, depth: float) -> list[int]:
    """A chat prompt: essays cut to ``context_tokens`` tokens with the needle at ``depth``."""
    from .assets.corpora import paul_graham_essays

    # ~8 characters per token is ample for English prose; only tokenize what is needed
    essays = "\n\n".join(paul_graham_essays().values())[: context_tokens * 8]
    haystack = tokenizer.encode(essays, add_special_tokens=False)[:context_tokens]
    cut = int(len(haystack) * depth)
    text = tokenizer.decode(haystack[:cut]) + " " + NEEDLE + " " + tokenizer.decode(haystack[cut:])
    messages = [{"role": "user", "content": f"{text}\n\n{QUESTION}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _soft_token_artifact(model_dir: Path, path: str | None, scratch: Path) -> tuple[str, str]:
    """The Judge Q artifact to use and whether it is trained; an untrained one if none."""
    from .soft_tokens import SoftTokens, init_soft_tokens

    if path is None and DEFAULT_ARTIFACT.is_file():
        path = str(DEFAULT_ARTIFACT)
    if path is not None:
        return path, "trained" if SoftTokens.load(path).training.get("trained") else "untrained"
    from .reference import load_reference_model

    untrained = scratch / "untrained.judgeq.safetensors"
    init_soft_tokens(load_reference_model(str(model_dir)), "SmolLM2-135M-Instruct", n_soft=32).save(untrained)
    return str(untrained), "untrained"


def run_demo(args: argparse.Namespace) -> int:
    # the table is the output; vLLM's per-engine start-up log would bury it
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from transformers import AutoTokenizer

    from .assets.smollm2 import smollm2_path
    from .vllm_adapter.demo import run_engine_demo

    budget = KVBudget.parse(args.budget)
    names = [name.strip() for name in args.policies.split(",") if name.strip()]
    for name in names:
        if name not in POLICIES:
            make_policy(name)  # raises the clear unknown-policy error

    model_dir = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = build_haystack_prompt(tokenizer, args.context_tokens, args.depth)
    print("model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), fp32, vLLM", end=" ")
    print(f"(CPU engine, block size 16); prompt {len(prompt)} tokens, needle at depth {args.depth:.0%}; budget {budget}")
    with tempfile.TemporaryDirectory() as scratch:
        artifact, state = (None, "")
        if "judgeq" in names:
            artifact, state = _soft_token_artifact(model_dir, args.soft_tokens, Path(scratch))
            print(f"judgeq soft tokens: {state} ({artifact if args.soft_tokens or state == 'trained' else 'random embedding rows'})")
        print()
        rows = run_engine_demo(
            str(model_dir), prompt, names, args.budget, soft_tokens=artifact,
            max_new_tokens=args.max_new_tokens, print_fn=None,
        )
    from .vllm_adapter.demo import format_rows

    print(format_rows(rows))
    found = {row.policy: NEEDLE_ANSWER in row.answer.lower() for row in rows}
    print("needle found: " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in found.items()))
    return 0
