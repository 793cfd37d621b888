"""Issue-5 acceptance runs on the GPU host: eviction vs vanilla vLLM in one run.

    python benchmarks/gpu_path_throughput.py throughput --model DIR --out DIR [--policies vanilla,snapkv,judgeq]
    python benchmarks/gpu_path_throughput.py prefill --model DIR --out DIR
    python benchmarks/gpu_path_throughput.py combine --out DIR FILE...

``throughput``: Llama-3.1-8B shape with dummy weights, ``kv_cache_memory_bytes`` 8 GiB,
64 requests x (8000 prompt, 1024 output), vanilla vLLM, ``snapkv`` and ``judgeq`` at
budget 1024; output tokens/s and the ratio to vanilla.
``prefill``: the same model with ample KV memory (40 GiB), 64 x (8000, 16): wall time of
``judgeq`` over vanilla (the cost of scoring and compaction, no memory pressure).

vLLM's defaults everywhere: CUDA graphs, async scheduling, Model Runner V2, FA3,
multiprocessing; prefix caching off (random prompts would not hit anyway). Judge Q uses a
random soft-token artifact of the model's shape (dummy weights: only its cost matters).
Each engine writes ``<out>/run-<part>-<policy>.json`` (provenance and every figure) as
soon as it is done; ``combine`` joins the runs of one host session into
``gpu-path-<part>-<device>.json`` with each policy's ratio to vanilla.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

GIB = 2**30
PARTS = {
    "throughput": dict(num_requests=64, prompt_len=8000, output_len=1024, kv_bytes=8 * GIB),
    "prefill": dict(num_requests=64, prompt_len=8000, output_len=16, kv_bytes=40 * GIB),
}
BUDGET = 1024


def random_artifact(model_dir: str, directory: str) -> str:
    from judgeq_vllm.soft_tokens import SoftTokens

    hidden = json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"]
    generator = torch.Generator().manual_seed(0)
    path = Path(directory) / "random.judgeq.safetensors"
    SoftTokens(torch.randn(32, hidden, generator=generator) * 0.02, "dummy-weights", "dummy").save(path)
    return str(path)


def run_engine(model_dir: str, policy: str | None, artifact: str, part: dict, max_capture: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from judgeq_vllm.vllm_adapter import llm_kwargs

    eviction = {} if policy is None else llm_kwargs(policy, BUDGET, soft_tokens=artifact if policy == "judgeq" else None)
    started = time.perf_counter()
    llm = LLM(
        model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
        kv_cache_memory_bytes=part["kv_bytes"], enable_prefix_caching=False,
        max_model_len=part["prompt_len"] + part["output_len"] + 64,
        # graphs for every decode batch this benchmark can form, not vLLM's 512: start-up time
        compilation_config={"max_cudagraph_capture_size": max_capture}, **eviction,
    )
    start_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(1)
    prompts = [
        TokensPrompt(prompt_token_ids=torch.randint(1000, 100000, (part["prompt_len"],), generator=generator).tolist())
        for _ in range(part["num_requests"])
    ]
    params = SamplingParams(max_tokens=part["output_len"], temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False), use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - started
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "policy": policy or "vanilla",
        "engine_start_s": round(start_s, 1),
        "wall_s": round(wall_s, 2),
        "output_tokens": output_tokens,
        "output_tok_per_s": round(output_tokens / wall_s, 1),
        "async_scheduling": llm.llm_engine.vllm_config.scheduler_config.async_scheduling,
        "cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode),
    }
    if policy is not None:
        client = llm.llm_engine.engine_core
        # in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) the client holds EngineCore itself
        core = getattr(client, "engine_core", None)
        result["eviction_stats"] = core.judgeq_stats() if core is not None else client.call_utility("judgeq_stats")
    llm.llm_engine.engine_core.shutdown()
    del llm
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=[*sorted(PARTS), "combine"])
    parser.add_argument("files", nargs="*", help="combine: the per-engine JSON files of one host session")
    parser.add_argument("--model", help="Llama-3.1-8B config + tokenizer folder (dummy weights)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--policies", default="vanilla,snapkv,judgeq")
    parser.add_argument("--max-capture", type=int, default=128)
    args = parser.parse_intermixed_args()
    if args.part == "combine":
        records = [json.loads(Path(f).read_text()) for f in args.files]
        write(combine(records), args.out, records[0]["device"])
        return
    part = PARTS[args.part]
    with tempfile.TemporaryDirectory() as tmp:
        artifact = random_artifact(args.model, tmp)
        for name in args.policies.split(","):
            run = run_engine(args.model, None if name == "vanilla" else name, artifact, part, args.max_capture)
            record = {**provenance(), "part": args.part, "budget": BUDGET, **part, "max_capture": args.max_capture,
                      "runs": [run]}
            # one file per engine, written as soon as it is done (a host can be taken back)
            Path(args.out, f"run-{args.part}-{run['policy']}.json").write_text(json.dumps(record, indent=2))


def combine(records: list[dict]) -> dict:
    """One record with every engine's run and each policy's ratio to vanilla's."""
    runs = [run for record in records for run in record["runs"]]
    vanilla = next(run for run in runs if run["policy"] == "vanilla")
    for run in runs:
        if run is not vanilla:
            run["tok_per_s_ratio_to_vanilla"] = round(run["output_tok_per_s"] / vanilla["output_tok_per_s"], 3)
            run["wall_ratio_to_vanilla"] = round(run["wall_s"] / vanilla["wall_s"], 3)
    first = records[0]
    return {**first, "commands": [record["command"] for record in records], "runs": runs}


def write(record: dict, out_dir: str, device: str) -> None:
    out = Path(out_dir) / f"gpu-path-{record['part']}-{device.replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
