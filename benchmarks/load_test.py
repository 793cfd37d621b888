"""Load and fault test: a real server on loopback, many concurrent streams, cancellations, bad input.

    python -m benchmarks.load_test --model PATH --requests 256 --kv-eviction snapkv --kv-budget 256 \\
        [--prompt-tokens 64 2048] [--output-tokens 8 128] [--out FILE.json] [-- EXTRA SERVE FLAGS]

Starts ``python -m judgeq_vllm.vllm_adapter.serve`` on 127.0.0.1 and sends every request at
once, streamed (``/v1/completions`` with token-id prompts of random length, ``ignore_eos``
and a random ``max_tokens``). Seeded, per request: a share carries invalid per-request
eviction settings (expected: HTTP 400), a share valid ones (eviction off, its own budget,
a compression boundary), and a share of the rest is cancelled by the client, either
before its first token or after a random number of them. Then it checks:

- every request is accounted for: completed (all ``max_tokens`` streamed, ``usage`` says
  so), cancelled, or rejected with 400; none failed otherwise;
- the engine agrees: ``vllm:request_success_total`` grew by completed + cancelled (the
  rejected never reached it), nothing is left running or waiting;
- the KV pool's free block count (``judgeq:kv_free_blocks``) is back at its starting value;
- the server still answers, and stops cleanly on SIGINT.

The JSON result (``--out``, default ``benchmarks/results/load-test-<policy>-<device>-<date>.json``)
carries provenance (device, vLLM version, git commit, command), the settings, the
outcomes, latency percentiles and every check; the exit code is 1 if a check failed.
Every loop is bounded (``--deadline-s`` for the load, fixed waits around it).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from judgeq_vllm.vllm_adapter.serve import LocalServer

from .provenance import ROOT, provenance

SERVED_MODEL_NAME = "load-test"
# how long the engine may take to settle (free blocks back, queues empty) after the load
SETTLE_TIMEOUT_S = 60.0
INVALID_SETTINGS = [
    {"kv_budget": 1.5},
    {"kv_budget": -8},
    {"kv_eviction": "some-other-policy"},
    {"kv_budjet": 64},
    {"kv_compress_prefix": 0},
    {"kv_compress_prefix": 10**9},
]


@dataclass(frozen=True)
class RequestSpec:
    """One request of the load, decided up front from the seed.

    Attributes:
        index: position in the load.
        prompt: token ids.
        max_tokens: tokens to stream (``ignore_eos``).
        settings: ``vllm_xargs``, or ``None``.
        expect_rejection: the settings are invalid: HTTP 400 expected.
        cancel_after_tokens: the client closes the stream after this many tokens (0:
            as soon as the response starts, often before prefill ends); ``None``: never.
    """

    index: int
    prompt: list[int]
    max_tokens: int
    settings: dict[str, Any] | None
    expect_rejection: bool
    cancel_after_tokens: int | None


@dataclass
class RequestResult:
    """What the client saw of one request. ``outcome``: completed, cancelled, rejected or failed."""

    index: int
    outcome: str = "failed"
    status: int | None = None
    tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    error: str | None = None


@dataclass
class LoadConfig:
    requests: int
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    cancel_fraction: float
    invalid_fraction: float
    settings_fraction: float
    token_ids: tuple[int, int]
    seed: int
    deadline_s: float


def make_requests(config: LoadConfig) -> list[RequestSpec]:
    rng = random.Random(config.seed)
    specs = []
    for index in range(config.requests):
        prompt = [rng.randint(*config.token_ids) for _ in range(rng.randint(*config.prompt_tokens))]
        max_tokens = rng.randint(*config.output_tokens)
        invalid = rng.random() < config.invalid_fraction
        if invalid:
            settings = rng.choice(INVALID_SETTINGS)
        elif rng.random() < config.settings_fraction:
            settings = rng.choice(
                [{"kv_eviction": "none"}, {"kv_budget": rng.choice([16, 48, 0.5])}, {"kv_compress_prefix": rng.randint(1, len(prompt))}]
            )
        else:
            settings = None
        cancel = None
        if not invalid and rng.random() < config.cancel_fraction:
            cancel = rng.randint(0, max_tokens - 1)
        specs.append(RequestSpec(index, prompt, max_tokens, settings, invalid, cancel))
    return specs


async def send(session: aiohttp.ClientSession, url: str, spec: RequestSpec) -> RequestResult:
    result = RequestResult(spec.index)
    body = {
        "model": SERVED_MODEL_NAME, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    if spec.settings is not None:
        body["vllm_xargs"] = spec.settings
    start = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            result.status = response.status
            if response.status != 200:
                result.error = (await response.text())[:300]
                result.outcome = "rejected" if response.status == 400 and spec.expect_rejection else "failed"
                return result
            if spec.cancel_after_tokens == 0:
                return _cancel(response, result)
            usage = None
            async for line in response.content:
                event = line.decode().strip()
                if not event.startswith("data: ") or event == "data: [DONE]":
                    continue
                chunk = json.loads(event[len("data: ") :])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    result.tokens += 1
                    if result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - start
                    if spec.cancel_after_tokens is not None and result.tokens >= spec.cancel_after_tokens:
                        return _cancel(response, result)
            result.latency_s = time.perf_counter() - start
            completed = usage is not None and usage["completion_tokens"] == spec.max_tokens and not spec.expect_rejection
            result.outcome = "completed" if completed else "failed"
            if not completed:
                result.error = f"stream ended with usage {usage} for max_tokens {spec.max_tokens}"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


def _cancel(response: aiohttp.ClientResponse, result: RequestResult) -> RequestResult:
    # closing the connection is what a client that goes away does; the server aborts the request
    response.close()
    result.outcome = "cancelled"
    return result


async def run_load(url: str, specs: list[RequestSpec], deadline_s: float) -> list[RequestResult]:
    connector = aiohttp.TCPConnector(limit=0)  # every request in flight at once
    timeout = aiohttp.ClientTimeout(total=deadline_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return list(await asyncio.gather(*(send(session, url, spec) for spec in specs)))


def metric_samples(url: str) -> dict[str, float]:
    """``/metrics`` samples by name, summed over label sets (one engine)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def settled_metrics(url: str) -> dict[str, float]:
    """The metrics once the engine is idle (nothing running or waiting) and its exported
    free block count has held still for a poll interval, or at the timeout.

    The eviction metrics reach ``/metrics`` through a poll of EngineCore once a second
    (``judgeq_vllm/vllm_adapter/metrics.py``), started by the server's first request.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    previous = None
    while True:
        samples = metric_samples(url)
        idle = samples.get("vllm:num_requests_running", 0) == 0 and samples.get("vllm:num_requests_waiting", 0) == 0
        free = samples.get("judgeq:kv_free_blocks")
        if (idle and free is not None and free == previous) or time.monotonic() > deadline:
            return samples
        previous = free if idle else None
        time.sleep(1.5)


def one_completion(url: str, max_tokens: int = 4) -> bool:
    body = json.dumps({"model": SERVED_MODEL_NAME, "prompt": "The server still answers:", "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return response.status == 200 and answer["usage"]["completion_tokens"] == max_tokens


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": round(pick(0.5), 4), "p90": round(pick(0.9), 4), "p99": round(pick(0.99), 4), "max": round(ordered[-1], 4)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = LoadConfig(
        requests=args.requests, prompt_tokens=tuple(args.prompt_tokens), output_tokens=tuple(args.output_tokens),
        cancel_fraction=args.cancel_fraction, invalid_fraction=args.invalid_fraction,
        settings_fraction=args.settings_fraction, token_ids=tuple(args.token_ids), seed=args.seed, deadline_s=args.deadline_s,
    )
    specs = make_requests(config)
    eviction = ["--kv-eviction", args.kv_eviction, "--kv-budget", str(args.kv_budget)]
    if args.judgeq_soft_tokens:
        eviction += ["--judgeq-soft-tokens", args.judgeq_soft_tokens]
    flags = ["--model", args.model, "--served-model-name", SERVED_MODEL_NAME, "--disable-uvicorn-access-log", *eviction, *args.serve_flags]
    log_path = Path(args.server_log or tempfile.mkstemp(prefix="load-test-server-", suffix=".log")[1])
    checks: dict[str, bool] = {}
    server = LocalServer(flags, log_path, startup_timeout_s=args.startup_timeout_s)
    with server:
        checks["server answers before the load"] = one_completion(server.url)
        before = settled_metrics(server.url)
        started = time.perf_counter()
        results = asyncio.run(run_load(server.url, specs, args.deadline_s))
        load_seconds = time.perf_counter() - started
        after = settled_metrics(server.url)
        checks["server answers after the load"] = one_completion(server.url)
        exit_code = server.stop()

    outcomes = {name: sum(result.outcome == name for result in results) for name in ("completed", "cancelled", "rejected", "failed")}

    def grown(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    # a cancelled request may have reached the engine or not, and may have finished there
    # before the abort arrived: the engine's counts lie between these bounds
    served_range = (outcomes["completed"], outcomes["completed"] + outcomes["cancelled"])
    engine_admitted = grown("judgeq:requests_total")
    engine_finished = grown("vllm:request_success_total")
    checks.update({
        "every request completed, cancelled or rejected": outcomes["failed"] == 0 and sum(outcomes.values()) == len(specs),
        "every invalid request rejected with 400": all(
            (result.outcome == "rejected") == spec.expect_rejection for spec, result in zip(specs, results)
        ),
        "the engine admitted no rejected request": served_range[0] <= engine_admitted <= served_range[1],
        "the engine finished every completed request": served_range[0] <= engine_finished <= served_range[1],
        "nothing left running or waiting": after.get("vllm:num_requests_running", 0) == 0
        and after.get("vllm:num_requests_waiting", 0) == 0,
        "free KV blocks back at their starting value": after.get("judgeq:kv_free_blocks") == before.get("judgeq:kv_free_blocks"),
        "server stopped cleanly": exit_code == 0,
    })
    completed = [result for result in results if result.outcome == "completed"]
    return {
        "provenance": provenance(),
        "config": {**asdict(config), "kv_eviction": args.kv_eviction, "kv_budget": args.kv_budget, "serve_flags": args.serve_flags},
        "outcomes": outcomes,
        "cancelled_before_first_token": sum(1 for s, r in zip(specs, results) if r.outcome == "cancelled" and r.tokens == 0),
        "requests_with_valid_settings": sum(1 for s in specs if s.settings is not None and not s.expect_rejection),
        "load_seconds": round(load_seconds, 2),
        "ttft_s": percentiles([r.ttft_s for r in completed if r.ttft_s is not None]),
        "latency_s": percentiles([r.latency_s for r in completed if r.latency_s is not None]),
        "engine": {
            "requests_admitted": engine_admitted,
            "requests_finished": engine_finished,
            "preemptions": grown("vllm:num_preemptions_total"),
            "kv_free_blocks": {"before": before.get("judgeq:kv_free_blocks"), "after": after.get("judgeq:kv_free_blocks")},
            "kv_total_blocks": after.get("judgeq:kv_total_blocks"),
            "compactions": grown("judgeq:compactions_total"),
            "blocks_freed_by_compaction": grown("judgeq:blocks_freed_total"),
            "eviction_step_seconds_sum": round(grown("judgeq:eviction_step_seconds_sum"), 4),
        },
        "failures": [asdict(result) for result in results if result.outcome == "failed"][:20],
        "checks": checks,
        "passed": all(checks.values()),
        "server_log": str(log_path),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (or name) to serve")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(64, 2048), metavar=("MIN", "MAX"))
    parser.add_argument("--output-tokens", type=int, nargs=2, default=(8, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--cancel-fraction", type=float, default=0.3, help="share of valid requests the client cancels")
    parser.add_argument("--invalid-fraction", type=float, default=0.1, help="share with invalid per-request settings")
    parser.add_argument("--settings-fraction", type=float, default=0.3, help="share of the others with valid per-request settings")
    parser.add_argument("--token-ids", type=int, nargs=2, default=(1000, 20000), metavar=("MIN", "MAX"),
                        help="prompt token ids are drawn from this range (ordinary tokens of any Llama-family vocabulary)")
    parser.add_argument("--kv-eviction", default="snapkv")
    parser.add_argument("--kv-budget", default="256")
    parser.add_argument("--judgeq-soft-tokens", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline-s", type=float, default=1800.0, help="the whole load must finish within this")
    parser.add_argument("--startup-timeout-s", type=float, default=900.0)
    parser.add_argument("--server-log", default=None, help="where the server's output goes (default: a temp file)")
    parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/load-test-<policy>-<device>-<date>.json)")
    parser.add_argument("serve_flags", nargs="*", help="after --: more flags for the server")
    return parser.parse_args(argv)


def default_out(policy: str, device: str) -> Path:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    return ROOT / "benchmarks" / "results" / f"load-test-{policy}-{device.replace(' ', '-')}-{date}.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out) if args.out else default_out(args.kv_eviction, result["provenance"]["device"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: result[key] for key in ("outcomes", "load_seconds", "engine", "checks", "passed")}, indent=2))
    print(f"wrote {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
