"""Per-layer views (PyramidKV on the GPU path) on CPU: the runner-side bookkeeping of
``LayerViews`` and what each layer's attention implementation reads from it.

Without CUDA, vLLM's ``StagedWriteTensor`` (pinned memory) is replaced by a plain-tensor
stand-in with the same two methods, and the kernel runs in the Triton interpreter; on the
GPU host both are the real ones.
"""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from judgeq_vllm.policies import KVBudget, make_policy
from judgeq_vllm.vllm_adapter.gpu import layer_views as layer_views_module
from judgeq_vllm.vllm_adapter.gpu.attention import PerLayerViewsImplMixin
from judgeq_vllm.vllm_adapter.gpu.layer_views import LayerViews
from judgeq_vllm.vllm_adapter.gpu.offsets import NO_PLAN, PLAN_FIELDS, plan_state_row
from judgeq_vllm.vllm_adapter.plan import plan_request

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_LAYERS, MAX_NUM_REQS, MAX_NUM_TOKENS, BLOCK_SIZE = 4, 8, 64, 16


class PlainStagedWriteTensor:
    """``StagedWriteTensor``'s interface over an ordinary tensor."""

    def __init__(self, size, dtype, device):
        self.gpu = torch.zeros(size, dtype=dtype, device=device)
        self.staged = []

    def stage_write(self, index, start, values):
        self.staged.append((index, start, list(values)))

    def apply_write(self):
        assert len(self.staged) <= self.gpu.shape[0], "more staged rows than apply_write takes"
        for index, start, values in self.staged:
            self.gpu[index, start : start + len(values)] = torch.tensor(values, dtype=self.gpu.dtype, device=self.gpu.device)
        self.staged.clear()


@pytest.fixture
def views(monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setattr(layer_views_module, "StagedWriteTensor", PlainStagedWriteTensor)
    return LayerViews(NUM_LAYERS, MAX_NUM_REQS, MAX_NUM_TOKENS, DEVICE)


def plans():
    pyramid = plan_request(300, make_policy("pyramidkv", window=8), KVBudget(tokens=64), BLOCK_SIZE, NUM_LAYERS)
    uniform = plan_request(200, make_policy("snapkv", window=8), KVBudget(tokens=50), BLOCK_SIZE, NUM_LAYERS)
    assert not pyramid.uniform and uniform.uniform
    return pyramid, uniform


def test_host_mirror_decides_which_batches_need_views(views):
    pyramid, uniform = plans()
    index = {"p": 3, "u": 0, "new": 5}
    views.set_plan(3, pyramid)
    views.set_plan(0, uniform)
    views.set_plan(3, pyramid)  # written twice in a step: one row
    views.apply_writes()
    assert views.keep_deficits.gpu[3].tolist() == [pyramid.keep - k for k in pyramid.layer_keeps]
    assert views.keep_deficits.gpu[0].tolist() == [0] * NUM_LAYERS
    assert views.batch_needs_views(["u", "p"], index)
    assert not views.batch_needs_views(["u", "new"], index)
    views.reset_slot(3)  # the slot goes to a new request
    assert not views.batch_needs_views(["u", "p"], index)


@dataclass
class FakeMetadata:
    seq_lens: torch.Tensor
    scheduler_metadata: torch.Tensor | None


class RecordingImpl:
    """Stands for vLLM's FlashAttentionImpl: records what it was given."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        self.seen_metadata = attn_metadata
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        self.seen_slots = slot_mapping


class PerLayerRecordingImpl(PerLayerViewsImplMixin, RecordingImpl):
    pass


def decode_step(views):
    """One decode token for the pyramid request (slot 3, at vLLM position 340) and one for
    a request without a plan (slot 5), padded to 3 rows and 4 tokens as a CUDA graph would."""
    pyramid, _ = plans()
    plan_state = torch.zeros(MAX_NUM_REQS, PLAN_FIELDS, dtype=torch.int32)
    plan_state[:, 0] = NO_PLAN
    plan_state[3] = torch.tensor(plan_state_row(pyramid), dtype=torch.int32)
    views.set_plan(3, pyramid)
    views.apply_writes()
    block_table = torch.arange(MAX_NUM_REQS * 32, dtype=torch.int32).view(MAX_NUM_REQS, 32) + 1000
    slot_mapping = torch.tensor([0, 777, -1, -1], dtype=torch.int64)  # vLLM's slots, PAD_SLOT_ID padding
    batch = SimpleNamespace(
        idx_mapping=torch.tensor([3, 5], dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor([0, 1, 2, 2], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([341, 60, 0], dtype=torch.int32, device=DEVICE),
        positions=torch.tensor([340, 59, 0, 0], dtype=torch.int64, device=DEVICE),
        num_reqs=2, num_reqs_after_padding=3, num_tokens=2, num_tokens_after_padding=4,
    )
    views.compute(batch, plan_state.to(DEVICE), block_table.to(DEVICE), slot_mapping.to(DEVICE), BLOCK_SIZE)
    return pyramid, block_table


def test_each_layer_reads_its_own_lengths_and_slots(views):
    pyramid, block_table = decode_step(views)
    assert views.active
    shared = FakeMetadata(
        seq_lens=torch.tensor([341 - (pyramid.total_len - pyramid.keep), 60, 0], dtype=torch.int32, device=DEVICE),
        scheduler_metadata=torch.ones(5, dtype=torch.int32, device=DEVICE),
    )
    for layer in range(NUM_LAYERS):
        impl = PerLayerRecordingImpl()
        impl.layer_views, impl.layer_index = views, layer
        impl.forward(None, None, None, None, None, shared, None)
        impl.do_kv_cache_update(None, None, None, None, torch.zeros(4, dtype=torch.int64, device=DEVICE))
        got = impl.seen_metadata
        assert got is not shared and got.scheduler_metadata is None
        assert got.seq_lens.tolist() == [341 - pyramid.layer_evicted_len(layer), 60, 0]
        logical = 340 - pyramid.layer_slot_shift(layer)
        expected_slot = int(block_table[3, logical // BLOCK_SIZE]) * BLOCK_SIZE + logical % BLOCK_SIZE
        assert impl.seen_slots.tolist() == [expected_slot, 777, -1, -1]
    # the metadata object is shared by every layer: never edited
    assert shared.scheduler_metadata is not None and shared.seq_lens[0] == 341 - (pyramid.total_len - pyramid.keep)


def test_inactive_views_change_nothing(views):
    decode_step(views)
    views.finish_step()
    impl = PerLayerRecordingImpl()
    impl.layer_views, impl.layer_index = views, 1
    metadata = FakeMetadata(seq_lens=torch.tensor([5]), scheduler_metadata=None)
    slots = torch.tensor([9])
    impl.forward(None, None, None, None, None, metadata, None)
    impl.do_kv_cache_update(None, None, None, None, slots)
    assert impl.seen_metadata is metadata and impl.seen_slots is slots


@pytest.mark.parametrize(
    "mode, splitting_ops, refused",
    [
        ("FULL_AND_PIECEWISE", ["vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"], False),
        ("FULL_AND_PIECEWISE", ["vllm::unified_attention_with_output"], True),  # KV write inside the pieces
        ("FULL_DECODE_ONLY", [], False),  # per-layer steps run eager
        ("NONE", [], False),
    ],
)
def test_per_layer_steps_need_the_kv_write_between_graph_pieces(mode, splitting_ops, refused):
    from vllm.config.compilation import CUDAGraphMode

    from judgeq_vllm.vllm_adapter.gpu.model_runner import EvictionGPUModelRunner

    runner = SimpleNamespace(
        compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode[mode], splitting_ops=splitting_ops),
        eviction_policy=make_policy("pyramidkv"),
    )
    if refused:
        with pytest.raises(ValueError, match="missing: vllm::unified_kv_cache_update"):
            EvictionGPUModelRunner._check_per_layer_graph_pieces(runner)
    else:
        EvictionGPUModelRunner._check_per_layer_graph_pieces(runner)


def test_every_layer_row_starts_16_byte_aligned(monkeypatch):
    """Odd buffer sizes too: Triton kernels reading a layer's row are specialised on alignment."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(layer_views_module, "StagedWriteTensor", PlainStagedWriteTensor)
    views = LayerViews(NUM_LAYERS, 10, 37, DEVICE)
    for layer in range(NUM_LAYERS):
        assert views.seq_lens[layer].data_ptr() % 16 == 0
        assert views.slot_mappings[layer].data_ptr() % 16 == 0
