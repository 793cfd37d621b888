"""The vLLM path against vanilla vLLM (no-op budgets) and the HF oracle (tight budgets).

16 real-text chat prompts of 100..3000 tokens, greedy, fp32, block size 16, one engine
per (policy, budget) serving all prompts in one batched call.
"""

import pytest
import torch

from judgeq_vllm.policies import KVBudget, make_policy
from judgeq_vllm.reference import generate_many
from judgeq_vllm.vllm_adapter import llm_kwargs
from judgeq_vllm.vllm_adapter.step import KeptIndexRecorder

from engine_helpers import MAX_NEW_TOKENS, engine_core, free_blocks, greedy, make_llm, model_runner, shutdown
from hf_oracle import near_tie_differences

POLICY_NAMES = ["judgeq", "snapkv", "h2o", "streamingllm", "knorm", "pyramidkv"]
BUDGETS = [64, 256]
# max_num_batched_tokens per configuration: the prompts are split at different places
CHUNK_SIZES = {64: [128, 200, 320, 512, 1000, 256], 256: [1000, 512, 320, 200, 128, 96]}
ORACLE_CONFIGS = [
    (name, budget, CHUNK_SIZES[budget][i]) for budget in BUDGETS for i, name in enumerate(POLICY_NAMES)
]


def policy_for(name, soft_tokens):
    return make_policy(name, soft_tokens=soft_tokens) if name == "judgeq" else make_policy(name)


def eviction(name, budget, soft_tokens_path):
    return llm_kwargs(name, budget, soft_tokens=soft_tokens_path if name == "judgeq" else None)


@pytest.fixture(scope="module")
def vanilla_tokens(smollm2_dir, engine_prompts):
    llm = make_llm(smollm2_dir)
    tokens = [list(out.outputs[0].token_ids) for out in greedy(llm, engine_prompts)]
    shutdown(llm)
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_budget_above_every_prompt_changes_nothing(name, smollm2_dir, engine_prompts, soft_tokens_path, vanilla_tokens):
    llm = make_llm(smollm2_dir, eviction(name, 4096, soft_tokens_path))
    outputs = greedy(llm, engine_prompts)
    stats = engine_core(llm).judgeq_stats()
    shutdown(llm)
    assert stats["requests_evicted"] == 0
    assert stats["requests_skipped"] == {"fits_budget": len(engine_prompts)}
    assert [list(out.outputs[0].token_ids) for out in outputs] == vanilla_tokens


@pytest.fixture(scope="module")
def hf_references(reference_model, soft_tokens, engine_prompts):
    """(name, budget) -> per prompt (EvictionResult, RecordedPrefill)."""
    references = {(name, budget): [] for name in POLICY_NAMES for budget in BUDGETS}
    for prompt in engine_prompts:
        for names in (["judgeq"], [name for name in POLICY_NAMES if name != "judgeq"]):
            configs = [(name, budget) for name in names for budget in BUDGETS]
            policies = [(policy_for(name, soft_tokens), KVBudget(tokens=budget)) for name, budget in configs]
            results, recorded = generate_many(reference_model, prompt, policies, MAX_NEW_TOKENS)
            for config, result in zip(configs, results):
                references[config].append((result, recorded))
    return references


def test_generate_many_equals_generate(reference_model, soft_tokens, engine_prompts):
    """The shared-prefill oracle gives exactly what reference.generate gives."""
    from judgeq_vllm.reference import generate

    prompt = engine_prompts[6]
    for names in (["judgeq"], ["snapkv", "knorm"]):
        policies = [(policy_for(name, soft_tokens), KVBudget(tokens=64)) for name in names]
        many, _ = generate_many(reference_model, prompt, policies, MAX_NEW_TOKENS)
        for (policy, budget), result in zip(policies, many):
            expected = generate(reference_model, prompt, policy, budget, MAX_NEW_TOKENS)
            assert result.token_ids == expected.token_ids
            assert result.cache_lengths == expected.cache_lengths
            assert all(torch.equal(a, b) for a, b in zip(result.kept_indices, expected.kept_indices))


@pytest.mark.slow
@pytest.mark.parametrize("name, budget, chunk", ORACLE_CONFIGS)
def test_engine_keeps_what_the_reference_keeps(
    name, budget, chunk, smollm2_dir, engine_prompts, soft_tokens, soft_tokens_path, hf_references
):
    llm = make_llm(smollm2_dir, eviction(name, budget, soft_tokens_path), max_num_batched_tokens=chunk)
    recorder = model_runner(llm).kept_index_recorder = KeptIndexRecorder()
    free_at_start = free_blocks(llm)
    outputs = greedy(llm, engine_prompts)
    free_at_end = free_blocks(llm)
    shutdown(llm)
    assert free_at_end == free_at_start

    policy = policy_for(name, soft_tokens)
    same_sets = total_sets = same_tokens = 0
    report = []
    for index, (prompt, output) in enumerate(zip(engine_prompts, outputs)):
        reference, recorded = hf_references[(name, budget)][index]
        # soft ids never leave the engine
        assert list(output.prompt_token_ids) == prompt
        tokens = list(output.outputs[0].token_ids)
        same_tokens += tokens == reference.token_ids
        if tokens != reference.token_ids:
            report.append(f"prompt {index} ({len(prompt)} tokens): engine {tokens} reference {reference.token_ids}")
        engine_kept = recorder.for_request(output.request_id)
        if reference.kept_indices is None:
            assert engine_kept is None, f"prompt {index} fits the budget but was compacted"
            continue
        assert sorted(engine_kept) == list(range(len(reference.kept_indices)))
        for layer, expected in enumerate(reference.kept_indices):
            got = engine_kept[layer]
            assert got.shape == expected.shape
            for head in range(expected.shape[0]):
                total_sets += 1
                same_sets += torch.equal(got[head], expected[head])
            if not torch.equal(got, expected):
                far = near_tie_differences(policy, recorded.score_inputs(policy, layer), got, expected)
                diff_heads = [h for h in range(expected.shape[0]) if not torch.equal(got[h], expected[h])]
                report.append(f"prompt {index} layer {layer}: heads {diff_heads} differ; non-near-tie tokens {far}")
                assert not far, f"prompt {index} layer {layer}: differences that are not near-ties: {far}"
    print(f"\n{name} budget {budget} chunk {chunk}: identical (layer, head) sets {same_sets}/{total_sets}, "
          f"identical greedy outputs {same_tokens}/{len(engine_prompts)}")
    print("\n".join(report))
    assert total_sets > 0
    assert same_sets >= 0.99 * total_sets
    assert same_tokens >= len(engine_prompts) - 1
