"""Issue-5 acceptance runs on the GPU host: eviction vs vanilla vLLM in one run.

    python benchmarks/gpu_path_throughput.py throughput --model DIR --out DIR [--policies vanilla,snapkv,judgeq]
    python benchmarks/gpu_path_throughput.py prefill --model DIR --out DIR
    python benchmarks/gpu_path_throughput.py decode --model DIR --out DIR
    python benchmarks/gpu_path_throughput.py combine --out DIR FILE...

``throughput``: Llama-3.1-8B shape with dummy weights, ``kv_cache_memory_bytes`` 8 GiB,
64 requests x (8000 prompt, 1024 output), vanilla vLLM, ``snapkv`` and ``judgeq`` at
budget 1024; output tokens/s and the ratio to vanilla.
``prefill``: the same model with ample KV memory (40 GiB), 64 x (8000, 16): wall time of
``judgeq`` over vanilla (the cost of scoring and compaction, no memory pressure).
``decode``: decode step time at equal resident KV tokens, ample memory: 64 requests x 512
new tokens, each evicting policy from 8000-token prompts down to 1024 kept tokens,
vanilla from 1024-token prompts; the median GPU-timeline period of the steps that decode
all 64 requests (CUDA events at each step's start, so host stalls count too).
``long-decode`` (issue 9, decode-time eviction): 8 GiB KV, 64 x (1000 prompt, 8000 output),
``--policies vanilla,gkv``: G-KV at budget 1024 (interval 128) vs vanilla output tokens/s.

A policy name may carry ``@N``, the engine's ``--kv-admission-horizon`` (``judgeq@0``: vLLM's
own admission). In-process engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) also report
their preemptions and the most requests running at once.

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
    "decode": dict(num_requests=64, prompt_len=8000, output_len=512, kv_bytes=40 * GIB),
    "long-decode": dict(num_requests=64, prompt_len=1000, output_len=8000, kv_bytes=8 * GIB),
}
BUDGET = 1024


def random_artifact(model_dir: str, directory: str) -> str:
    from judgeq_vllm.soft_tokens import SoftTokens

    hidden = json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"]
    generator = torch.Generator().manual_seed(0)
    path = Path(directory) / "random.judgeq.safetensors"
    SoftTokens(torch.randn(32, hidden, generator=generator) * 0.02, "dummy-weights", "dummy").save(path)
    return str(path)


class StepRecorder:
    """Hooks on an in-process engine: preemptions, running requests per step, a CUDA event
    at the start of every model-runner step with its batch shape and compaction jobs, the
    host seconds spent in ``schedule`` and ``execute_model``, and Triton JIT compiles."""

    def __init__(self, core) -> None:
        import triton

        self.reset()
        scheduler, runner = core.scheduler, core.model_executor.driver_worker.worker.model_runner
        preempt, schedule, execute = scheduler._preempt_request, scheduler.schedule, runner.execute_model
        compile_hook = triton.knobs.runtime.jit_post_compile_hook

        def counting_preempt(*args, **kwargs):
            self.preemptions += 1
            return preempt(*args, **kwargs)

        def counting_schedule(*args, **kwargs):
            started = time.perf_counter()
            output = schedule(*args, **kwargs)
            self.schedule_s += time.perf_counter() - started
            self.most_running = max(self.most_running, len(scheduler.running))
            return output

        def timed_execute(scheduler_output, *args, **kwargs):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            # prefill compactions and G-KV events (decode-time compactions)
            jobs = len(getattr(scheduler_output, "judgeq_jobs", None) or ()) + len(
                getattr(scheduler_output, "judgeq_gkv_jobs", None) or ()
            )
            self.steps.append((event, len(scheduler_output.num_scheduled_tokens), scheduler_output.total_num_scheduled_tokens, jobs))
            started = time.perf_counter()
            try:
                return execute(scheduler_output, *args, **kwargs)
            finally:
                self.execute_s += time.perf_counter() - started

        def counting_compile(**kwargs):
            self.jit_compiles.append(getattr(kwargs.get("fn"), "name", "?"))
            return compile_hook(**kwargs) if compile_hook is not None else None

        scheduler._preempt_request, scheduler.schedule, runner.execute_model = counting_preempt, counting_schedule, timed_execute
        triton.knobs.runtime.jit_post_compile_hook = counting_compile

    def reset(self) -> None:
        self.preemptions, self.most_running, self.schedule_s, self.execute_s = 0, 0, 0.0, 0.0
        self.steps: list[tuple[torch.cuda.Event, int, int, int]] = []
        self.jit_compiles: list[str] = []

    def step_summary(self, detail: bool = True) -> dict:
        """Where the time went: GPU-timeline periods between step starts, split by steps
        with and without compaction jobs, host seconds, and kernels compiled mid-run;
        ``detail``: every step's shape, else the median period per batch size."""
        torch.cuda.synchronize()
        periods = [start.elapsed_time(end) for (start, *_), (end, *_) in zip(self.steps, self.steps[1:])]
        with_jobs = [period for period, (_, _, _, jobs) in zip(periods, self.steps) if jobs]
        return {
            "steps": len(self.steps),
            "scheduled_tokens": sum(tokens for _, _, tokens, _ in self.steps),
            "steps_with_jobs": len(with_jobs),
            "period_s_with_jobs": round(sum(with_jobs) / 1e3, 3),
            "period_s_without_jobs": round((sum(periods) - sum(with_jobs)) / 1e3, 3),
            "schedule_host_s": round(self.schedule_s, 3),
            "execute_host_s": round(self.execute_s, 3),
            "jit_compiles": self.jit_compiles,
            **({"step_detail": self._step_detail(periods)} if detail else {"median_ms_by_batch": self._by_batch(periods)}),
        }

    def _step_detail(self, periods: list[float]) -> list[tuple]:
        # (requests, tokens, jobs, ms to the next step's start), for a look at the shape
        return [(reqs, tokens, jobs, round(period, 2)) for (_, reqs, tokens, jobs), period in zip(self.steps, periods)]

    def _by_batch(self, periods: list[float]) -> dict[str, dict]:
        """Per number of requests in the step: steps and median period, without and with jobs."""
        groups: dict[tuple[int, bool], list[float]] = {}
        for (_, reqs, _, jobs), period in zip(self.steps, periods):
            groups.setdefault((reqs, bool(jobs)), []).append(period)
        return {
            f"{reqs}{' with jobs' if jobs else ''}": {"steps": len(values), "median_ms": round(sorted(values)[len(values) // 2], 3)}
            for (reqs, jobs), values in sorted(groups.items())
        }

    def decode_step_ms(self, batch: int) -> dict:
        """Periods between consecutive step starts where both steps decode ``batch`` requests
        (one token each); the last step has no successor and is left out."""
        torch.cuda.synchronize()
        periods = [
            start.elapsed_time(end)
            for (start, reqs, tokens, _), (end, next_reqs, next_tokens, _) in zip(self.steps, self.steps[1:])
            if reqs == tokens == batch and next_reqs == next_tokens == batch
        ]
        if not periods:
            return {"decode_steps": 0}
        periods.sort()
        return {"decode_steps": len(periods), "decode_step_ms_median": round(periods[len(periods) // 2], 4),
                "decode_step_ms_mean": round(sum(periods) / len(periods), 4)}


def run_engine(model_dir: str, policy: str | None, artifact: str, part: dict, max_capture: int, part_name: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from judgeq_vllm.vllm_adapter import llm_kwargs

    name, _, reserve = (policy or "").partition("@")
    eviction = {} if policy is None else llm_kwargs(
        name, BUDGET, soft_tokens=artifact if name.startswith("judgeq") else None,
        admission_horizon=int(reserve) if reserve else None
    )
    # at equal resident tokens: vanilla's prompt is what the policies keep
    prompt_len = BUDGET if part_name == "decode" and policy is None else part["prompt_len"]
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
        TokensPrompt(prompt_token_ids=torch.randint(1000, 100000, (prompt_len,), generator=generator).tolist())
        for _ in range(part["num_requests"])
    ]
    params = SamplingParams(max_tokens=part["output_len"], temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False), use_tqdm=False)
    # in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) the client holds EngineCore itself
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    recorder = StepRecorder(core) if core is not None else None
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - started
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "policy": policy or "vanilla",
        "prompt_len": prompt_len,
        "engine_start_s": round(start_s, 1),
        "wall_s": round(wall_s, 2),
        "output_tokens": output_tokens,
        "output_tok_per_s": round(output_tokens / wall_s, 1),
        "async_scheduling": llm.llm_engine.vllm_config.scheduler_config.async_scheduling,
        "cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode),
    }
    if recorder is not None:
        result.update(preemptions=recorder.preemptions, most_running=recorder.most_running,
                      **recorder.decode_step_ms(part["num_requests"]))
        if part_name in ("prefill", "long-decode"):
            result["step_summary"] = recorder.step_summary(detail=part_name == "prefill")
    if policy is not None:
        client = llm.llm_engine.engine_core
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
            run = run_engine(args.model, None if name == "vanilla" else name, artifact, part, args.max_capture, args.part)
            record = {**provenance(), "part": args.part, "budget": BUDGET, **part, "max_capture": args.max_capture,
                      "runs": [run]}
            # one file per engine, written as soon as it is done (a host can be taken back)
            Path(args.out, f"run-{args.part}-{run['policy'].replace('@', '-reserve')}.json").write_text(json.dumps(record, indent=2))


def combine(records: list[dict]) -> dict:
    """One record with every engine's run and each policy's ratio to vanilla's."""
    runs = [run for record in records for run in record["runs"]]
    vanilla = next(run for run in runs if run["policy"] == "vanilla")
    for run in runs:
        if run is not vanilla:
            run["tok_per_s_ratio_to_vanilla"] = round(run["output_tok_per_s"] / vanilla["output_tok_per_s"], 3)
            run["wall_ratio_to_vanilla"] = round(run["wall_s"] / vanilla["wall_s"], 3)
            if run.get("decode_step_ms_median") and vanilla.get("decode_step_ms_median"):
                run["decode_step_ratio_to_vanilla"] = round(run["decode_step_ms_median"] / vanilla["decode_step_ms_median"], 4)
    first = records[0]
    return {**first, "commands": [record["command"] for record in records], "runs": runs}


def write(record: dict, out_dir: str, device: str) -> None:
    out = Path(out_dir) / f"gpu-path-{record['part']}-{device.replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
