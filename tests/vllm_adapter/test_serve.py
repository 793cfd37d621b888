"""A real OpenAI-compatible server with --kv-eviction, driven by the official client."""

import ast
import functools
import subprocess
import sys
import time
import urllib.request

import pytest

from judgeq_vllm.vllm_adapter.serve import LocalServer

SERVE_FLAGS = [
    "--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager", "--block-size", "16",
    "--max-model-len", "1024", "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", str(256 * 2**20),
]


def serve_flags(model_dir, *flags):
    return ["--model", model_dir, *SERVE_FLAGS, *flags]


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with LocalServer(serve_flags(smollm2_dir, "--kv-eviction", "snapkv", "--kv-budget", "64", "--kv-window", "16"), log_path) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120)


@pytest.fixture(scope="module")
def long_text(tokenizer, engine_prompts):
    return tokenizer.decode(engine_prompts[11], skip_special_tokens=True)


def test_completions_streaming_and_not(client, tokenizer, long_text):
    prompt = long_text + "\nIn one sentence, this passage is about"
    full = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0.0)
    assert full.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"]) > 64  # the user's tokens only
    assert full.usage.completion_tokens == 16 and full.choices[0].text
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0.0, stream=True)
    )
    assert streamed == full.choices[0].text


def test_chat_streaming_and_not(client, tokenizer, long_text):
    messages = [{"role": "user", "content": long_text + "\n\nWho speaks in this passage?"}]
    full = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0.0)
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected_prompt = expected_prompt["input_ids"] if hasattr(expected_prompt, "keys") else expected_prompt
    assert full.usage.prompt_tokens == len(expected_prompt) > 64
    assert full.choices[0].message.content
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=16, temperature=0.0, stream=True
        )
        if chunk.choices
    )
    assert streamed == full.choices[0].message.content


def metric_samples(server) -> dict[str, float]:
    """``judgeq:*`` samples of ``/metrics``, keyed ``name{label=value,...}`` without the
    ``model_name`` and ``engine`` labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k not in ("model_name", "engine")}
            key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")
            if key.startswith("judgeq:"):
                samples[key] = sample.value
    return samples


def settled_samples(server, expected: dict[str, float], timeout_s: float = 20.0) -> dict[str, float]:
    """The samples once every key of ``expected`` has its value: EngineCore's counters reach
    /metrics through a poll every second."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = metric_samples(server)
        if all(samples.get(key) == value for key, value in expected.items()) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def xargs(**settings):
    return {"vllm_xargs": settings}


def test_per_request_settings_over_http(server, client, tokenizer, long_text):
    prompt = tokenizer(long_text)["input_ids"]  # completions take token ids: exact lengths
    ask = functools.partial(client.completions.create, model="smollm2", prompt=prompt, max_tokens=8, temperature=0.0)
    ask()  # the metrics poller starts with the first request
    time.sleep(2)
    before = metric_samples(server)
    boundary = len(prompt) - 20
    ask(extra_body=xargs(kv_budget=32))
    ask(extra_body=xargs(kv_compress_prefix=boundary))
    off = ask(extra_body=xargs(kv_eviction="none"))
    fits = ask(extra_body=xargs(kv_budget=4096))
    # both run without eviction: the full prompt's KV
    assert off.choices[0].text == fits.choices[0].text

    def grown(key, by):
        return {key: before.get(key, 0.0) + by}

    expected = {
        **grown("judgeq:requests_total{policy=snapkv}", 2),
        **grown("judgeq:requests_total{policy=none}", 2),
        **grown("judgeq:requests_skipped_total{reason=off_by_request}", 1),
        **grown("judgeq:requests_skipped_total{reason=fits_budget}", 1),
        **grown("judgeq:compactions_total", 2),
        # the whole prompt kept 32 rows per head; the compressed context kept the server's 64
        **grown("judgeq:tokens_evicted_total", (len(prompt) - 32) + (boundary - 64)),
        **grown("judgeq:compression_ratio_count", 2),
        **grown("judgeq:eviction_step_seconds_count", 2),
    }
    after = settled_samples(server, expected)
    assert {key: after.get(key) for key in expected} == expected
    assert after["judgeq:blocks_freed_total"] > before["judgeq:blocks_freed_total"]
    assert after["judgeq:eviction_step_seconds_sum"] > before["judgeq:eviction_step_seconds_sum"]
    assert after["judgeq:compression_ratio_bucket{le=+Inf}"] == after["judgeq:compression_ratio_count"]
    # idle: every block free. Under async scheduling a finished request's blocks come back one
    # step after its last token has reached the client, so the gauge may lag its response
    idle = settled_samples(server, {"judgeq:kv_free_blocks": after["judgeq:kv_total_blocks"]})
    assert idle["judgeq:kv_free_blocks"] == idle["judgeq:kv_total_blocks"] > 0


INVALID_SETTINGS = [
    (dict(kv_budget=1.5), "compression ratio must be in [0, 1)"),
    (dict(kv_budget="lots"), "neither a token count"),
    (dict(kv_budjet=64), "unknown per-request eviction setting 'kv_budjet'"),
    (dict(kv_eviction="h2o"), "kv_eviction must be 'none' (no eviction for this request) or 'snapkv'"),
    (dict(kv_compress_prefix=0), "kv_compress_prefix must be a positive whole number"),
    (dict(kv_compress_prefix=100000), "lies beyond the prompt's"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("settings, message", INVALID_SETTINGS)
def test_invalid_settings_get_400_and_the_server_keeps_serving(client, settings, message, stream):
    import openai

    messages = [{"role": "user", "content": "Say hello. " * 20}]
    calls = [
        functools.partial(client.completions.create, prompt="Say hello. " * 20),
        functools.partial(client.chat.completions.create, messages=messages),
    ]
    for call in calls:
        with pytest.raises(openai.BadRequestError) as refused:
            # a stream that started would answer 200 and carry the error inside it
            list(call(model="smollm2", max_tokens=4, stream=stream, extra_body=xargs(**settings)))
        assert refused.value.status_code == 400
        assert message in refused.value.message
    served = client.completions.create(model="smollm2", prompt="Say hello.", max_tokens=4)
    assert served.choices[0].finish_reason == "length"


def test_server_shuts_down_cleanly_and_reports_what_it_freed(server, client, long_text):
    client.completions.create(model="smollm2", prompt=long_text, max_tokens=4, temperature=0.0)
    assert server.stop() == 0
    log = server.log_path.read_text()
    counters = [
        ast.literal_eval(line.split("judgeq eviction counters: ", 1)[1])
        for line in log.splitlines()
        if "judgeq eviction counters: " in line
    ]
    assert counters, log[-3000:]
    assert counters[-1]["requests_evicted"] >= 1 and counters[-1]["blocks_freed"] > 0, counters


def test_misconfigured_start_exits_with_the_fix(smollm2_dir):
    command = [sys.executable, "-m", "judgeq_vllm.vllm_adapter.serve", *serve_flags(smollm2_dir, "--kv-eviction", "judgeq", "--kv-budget", "64")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "--kv-eviction judgeq needs --judgeq-soft-tokens PATH: train an artifact" in result.stderr + result.stdout
