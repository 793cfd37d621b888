"""Kernel tests: compiled on a CUDA machine, in the Triton interpreter elsewhere.

Triton decides between interpreter and compiler when a kernel is *defined*, that is when
`judgeq_vllm.kernels` is imported, so the choice is made here, before any test module of
this folder is imported. A kernels package imported earlier in the other mode (by a plugin
or another conftest) is dropped from `sys.modules` so that the tests import it afresh.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def _drop_stale_kernels() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    module = sys.modules.get("judgeq_vllm.kernels.compact.triton")
    if module is None or isinstance(module.compact_kernel, InterpretedFunction) == INTERPRET:
        return
    for name in [n for n in sys.modules if n.startswith("judgeq_vllm.kernels")]:
        del sys.modules[name]


_drop_stale_kernels()
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(
        reason="GPU test: needs CUDA and compiled kernels (TRITON_INTERPRET unset)"
    )
    for item in items:
        if _HERE in Path(item.path).parents and "gpu" in item.keywords and INTERPRET:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    """Fills float `torch.empty*` with NaN so that an output the kernels forget to write fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture
def paged_cache():
    return make_paged_cache


def make_paged_cache(
    num_tokens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    layout: str = "NHD",
    num_layers: int = 0,
    spare_blocks: int = 3,
) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    """Random caches and a random permuted block table for requests of `num_tokens` tokens.

    Each request owns just enough blocks (the last one partly filled); the rest of its
    table row points at block 0, as vLLM's null block. `spare_blocks` blocks belong to no
    request. layout: "NHD" (vLLM's default, physical [blocks, BS, HKV, 2D]), "HND"
    (contiguous logical shape) or "padded" (NHD with a gap between pages, as MRV2 makes
    for padded page sizes). `num_layers` > 0 returns that many caches in a list.
    """
    blocks_per_req = [-(-n // block_size) for n in num_tokens]
    num_blocks = 1 + sum(blocks_per_req) + spare_blocks
    perm = torch.randperm(num_blocks - 1) + 1
    block_tables = torch.zeros(len(num_tokens), max(blocks_per_req) + 1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(blocks_per_req):
        block_tables[b, :n] = perm[start : start + n]
        start += n

    physical = (num_blocks, block_size, num_kv_heads, 2 * head_dim)
    if layout == "HND":
        physical = (num_blocks, num_kv_heads, block_size, 2 * head_dim)
    page = block_size * num_kv_heads * 2 * head_dim
    page_stride = page + (8 * head_dim if layout == "padded" else 0)
    strides = (page_stride, *torch.empty(physical[1:], device="meta").stride())

    def one_cache() -> torch.Tensor:
        raw = torch.randn(num_blocks * page_stride, dtype=dtype, device=device)
        cache = raw.as_strided(physical, strides)
        return cache if layout == "HND" else cache.permute(0, 2, 1, 3)

    caches = [one_cache() for _ in range(max(num_layers, 1))]
    return (caches if num_layers else caches[0]), block_tables.to(device)
