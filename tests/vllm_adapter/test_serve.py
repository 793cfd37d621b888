"""A real OpenAI-compatible server with --kv-eviction, driven by the official client."""

import ast
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

STARTUP_TIMEOUT_S = 300
SHUTDOWN_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model_dir, port, *flags):
    return [
        sys.executable, "-m", "judgeq_vllm.vllm_adapter.serve", "--model", model_dir, "--served-model-name", "smollm2",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--block-size", "16",
        "--max-model-len", "1024", "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", str(256 * 2**20),
        *flags,
    ]


def server_env():
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real process layout
    return env


def stop(process) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            serve_command(smollm2_dir, port, "--kv-eviction", "snapkv", "--kv-budget", "64", "--kv-window", "16"),
            stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            assert process.poll() is None, f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not up in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(2)
        yield {"url": f"http://127.0.0.1:{port}/v1", "process": process, "log": log_path}
    finally:
        if process.poll() is None:
            stop(process)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"], api_key="unused", timeout=120)


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


def test_server_shuts_down_cleanly_and_reports_what_it_freed(server, client, long_text):
    client.completions.create(model="smollm2", prompt=long_text, max_tokens=4, temperature=0.0)
    assert stop(server["process"]) == 0
    log = server["log"].read_text()
    counters = [
        ast.literal_eval(line.split("judgeq eviction counters: ", 1)[1])
        for line in log.splitlines()
        if "judgeq eviction counters: " in line
    ]
    assert counters, log[-3000:]
    assert counters[-1]["requests_evicted"] >= 1 and counters[-1]["blocks_freed"] > 0, counters


def test_misconfigured_start_exits_with_the_fix(smollm2_dir):
    result = subprocess.run(
        serve_command(smollm2_dir, free_port(), "--kv-eviction", "judgeq", "--kv-budget", "64"),
        capture_output=True, text=True, env=server_env(), timeout=180,
    )
    assert result.returncode != 0
    assert "--kv-eviction judgeq needs --judgeq-soft-tokens PATH: train an artifact" in result.stderr + result.stdout
