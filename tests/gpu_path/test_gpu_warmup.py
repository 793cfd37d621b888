"""The GPU runner's kernel warm-up (Triton interpreter on CPU, compiled on the GPU host):
it runs scoring for both tile shapes and a compaction, and writes nothing to the cache;
G-KV engines also compile the ring-row and key-similarity kernels, and decode-time
policies alone (gkv, streamingllm-decode) the compaction."""

from types import SimpleNamespace

import pytest
import torch

from judgeq_vllm.kernels.score import triton as score_triton
from judgeq_vllm.policies import GKVPolicy, ObservationSource, StreamingLLMDecodePolicy, make_policy
from judgeq_vllm.vllm_adapter.gpu import warmup

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_KV_HEADS, NUM_Q_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_LAYERS = 2, 4, 16, 16, 3


def fake_runner(policy, num_blocks: int, table_width: int, layer_views=None, gkv_policy=None, gkv_ring=None):
    cache = torch.randn(num_blocks, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, device=DEVICE)
    block_table = torch.zeros(4, table_width, dtype=torch.int32, device=DEVICE)
    return SimpleNamespace(
        kv_caches=[cache],
        eviction_policy=policy,
        block_tables=SimpleNamespace(
            block_tables=[SimpleNamespace(gpu=block_table)],
            input_block_tables=[torch.zeros_like(block_table)],
            slot_mappings=torch.zeros(1, 64, dtype=torch.int64, device=DEVICE),
        ),
        layer_views=layer_views,
        gkv_policy=gkv_policy,
        gkv_ring=gkv_ring,
        num_attention_layers=NUM_LAYERS,
        model_config=SimpleNamespace(get_num_attention_heads=lambda parallel_config: NUM_Q_HEADS),
        parallel_config=None,
        device=torch.device(DEVICE),
        kernel_block_size=BLOCK_SIZE,
    )


@pytest.mark.parametrize("name", ["snapkv", "streamingllm"])
def test_warm_up_scores_both_tile_shapes_and_writes_nothing(name, monkeypatch):
    policy = make_policy(name)
    # 1,100 blocks: room for the long jobs (8,192 keys each, three of them pass 16K keys)
    runner = fake_runner(policy, num_blocks=1100, table_width=600)
    before = runner.kv_caches[0].clone()
    launches = []
    launch_plan = score_triton._launch_plan

    def recording_launch_plan(config, batch, *args):
        plan = launch_plan(config, batch, *args)
        launches.append((batch, plan.meta["BLOCK_N"]))
        return plan

    monkeypatch.setattr(score_triton, "_launch_plan", recording_launch_plan)
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *args: None)
    warmup.warm_up_kernels(runner)
    assert torch.equal(runner.kv_caches[0], before)
    if policy.observation_source == ObservationSource.NONE:
        assert launches == []
    else:
        # one short job with 64-key tiles, then 128-key tiles: the two shapes the engine uses
        assert [block_n for _, block_n in launches] == [64, 128]


def test_warm_up_runs_the_per_layer_offsets_on_the_runners_buffers(monkeypatch):
    """pyramidkv: the per-layer kernel is compiled on the runner's own per-layer buffers
    (their strides are the ones serving uses); a row without a plan copies vLLM's values."""
    views = SimpleNamespace(
        keep_deficits=SimpleNamespace(gpu=torch.zeros(4, NUM_LAYERS, dtype=torch.int32, device=DEVICE)),
        seq_lens=torch.full((NUM_LAYERS, 16), -1, dtype=torch.int32, device=DEVICE),
        slot_mappings=torch.full((NUM_LAYERS, 64), -1, dtype=torch.int64, device=DEVICE),
    )
    runner = fake_runner(make_policy("pyramidkv"), num_blocks=40, table_width=32, layer_views=views)
    before = runner.kv_caches[0].clone()
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *args: None)
    warmup.warm_up_kernels(runner)
    assert torch.equal(runner.kv_caches[0], before)
    assert views.seq_lens[:, 0].tolist() == [1] * NUM_LAYERS
    assert views.slot_mappings[:, 0].tolist() == [0] * NUM_LAYERS
    assert not runner.block_tables.input_block_tables[0].any()


def recording_compactions(monkeypatch) -> list[torch.dtype]:
    """The kept-row dtype of every compaction the warm-up runs."""
    from judgeq_vllm.kernels.compact import triton as compact_triton

    compactions = []
    compact = compact_triton.compact_paged

    def recording_compact(*args, **kwargs):
        compactions.append(args[3].dtype)
        return compact(*args, **kwargs)

    monkeypatch.setattr(warmup, "compact_paged", recording_compact)
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *args: None)
    return compactions


@pytest.mark.parametrize("name", [None, "snapkv"])
def test_warm_up_of_a_gkv_engine_compiles_ring_rows_and_compaction(name, monkeypatch):
    """gkv (no prefill policy) and a prefill policy with G-KV: the ring-row kernel runs on
    the runner's own buffers, a compaction runs, the cache is untouched."""
    from judgeq_vllm.vllm_adapter.gpu.gkv_window import NO_SCHEDULE

    ring = SimpleNamespace(
        first_events=SimpleNamespace(gpu=torch.full((4,), NO_SCHEDULE, dtype=torch.int32, device=DEVICE)),
        ring_rows=torch.full((64,), -1, dtype=torch.int64, device=DEVICE),
        interval=128,
        window=16,
    )
    runner = fake_runner(make_policy(name) if name else None, num_blocks=40, table_width=32, gkv_policy=GKVPolicy(),
                         gkv_ring=ring)
    before = runner.kv_caches[0].clone()
    compactions = recording_compactions(monkeypatch)
    similarity_keys = []
    similarity = warmup.similarity_column_stats
    monkeypatch.setattr(warmup, "similarity_column_stats",
                        lambda keys, *args: similarity_keys.append(keys) or similarity(keys, *args))
    warmup.warm_up_kernels(runner)
    assert torch.equal(runner.kv_caches[0], before)
    assert compactions and set(compactions) == {torch.int64}
    # the redundancy kernel, on keys of the cache's dtype and head layout
    (keys,) = similarity_keys
    cache = runner.kv_caches[0]
    assert keys.dtype == cache.dtype and keys.shape[1] == cache.shape[1] and keys.shape[3] == cache.shape[3] // 2
    # the spare row of a 4-slot ring of 16-query windows; the rest untouched
    assert ring.ring_rows[:2].tolist() == [4 * 16, -1]


def test_warm_up_of_a_streaming_decode_engine_compiles_the_compaction(monkeypatch):
    """streamingllm-decode (no prefill policy, no query ring): its events' compaction
    runs once, in place, with serving's index dtypes."""
    runner = fake_runner(None, num_blocks=40, table_width=32, gkv_policy=StreamingLLMDecodePolicy())
    before = runner.kv_caches[0].clone()
    compactions = recording_compactions(monkeypatch)
    warmup.warm_up_kernels(runner)
    assert torch.equal(runner.kv_caches[0], before)
    assert compactions == [torch.int64]
