"""``judgeq-vllm demo``: a needle in a haystack, answered with every policy's compressed KV.

Runs the embedded default model (SmolLM2-135M-Instruct, real weights from the offline
assets) with the HF reference implementation: prefill a ~2K-token prompt, evict down to
the budget, decode greedily, and report what each policy kept and freed next to the
full-KV answer. (The vLLM engine path replaces the reference here once it lands.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

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
    parser.add_argument("--context-tokens", type=int, default=2000, help="haystack length in tokens")
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


def _soft_tokens(model, path: str | None):
    from .soft_tokens import SoftTokens, init_soft_tokens

    if path is None and not DEFAULT_ARTIFACT.is_file():
        return init_soft_tokens(model, "SmolLM2-135M-Instruct", n_soft=32), "untrained"
    soft = SoftTokens.load(path or DEFAULT_ARTIFACT)
    return soft, "trained" if soft.training.get("trained") else "untrained"


def run_demo(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .assets.smollm2 import smollm2_path
    from .reference import generate, load_reference_model

    budget = KVBudget.parse(args.budget)
    names = [name.strip() for name in args.policies.split(",") if name.strip()]
    for name in names:
        if name not in POLICIES:
            make_policy(name)  # raises the clear unknown-policy error

    model_dir = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_reference_model(str(model_dir), dtype=torch.float32)
    config = model.config
    prompt = build_haystack_prompt(tokenizer, args.context_tokens, args.depth)
    bytes_per_token = 2 * config.num_key_value_heads * config.head_dim * config.num_hidden_layers * 4
    print("model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized; fp32 on CPU), HF reference path")
    print(f"prompt: {len(prompt)} tokens, needle at depth {args.depth:.0%}; budget: {budget}\n")

    rows = []
    start = time.monotonic()
    full = generate(model, prompt, make_policy("streamingllm"), KVBudget(tokens=len(prompt)), args.max_new_tokens)
    rows.append(("full KV", len(prompt), 0, full, time.monotonic() - start))
    soft, soft_state = (_soft_tokens(model, args.soft_tokens) if "judgeq" in names else (None, ""))
    for name in names:
        policy = make_policy(name, soft_tokens=soft) if name == "judgeq" else make_policy(name)
        label = f"judgeq ({soft_state})" if name == "judgeq" else name
        start = time.monotonic()
        result = generate(model, prompt, policy, budget, args.max_new_tokens)
        kept = max(result.cache_lengths)
        rows.append((label, kept, len(prompt) - kept, result, time.monotonic() - start))

    print(f"{'policy':<22} {'kept/head':>9} {'freed/head':>10} {'freed MiB':>9} {'needle':>6} {'s':>5}  answer")
    for label, kept, freed, result, seconds in rows:
        answer = tokenizer.decode(result.token_ids, skip_special_tokens=True).strip().replace("\n", " ")
        found = "yes" if NEEDLE_ANSWER in answer.lower() else "no"
        print(
            f"{label:<22} {kept:>9} {freed:>10} {freed * bytes_per_token / 2**20:>9.1f} {found:>6} {seconds:>5.1f}  {answer[:70]}"
        )
    print("\nfreed = prompt KV entries dropped per (layer, kv head); MiB over all layers at fp32.")
    return 0
