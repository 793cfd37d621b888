"""benchmarks.long_generation: samples, scoring, and the CPU smoke run (schema and sanity, not quality)."""

import pytest


def test_scores_count_the_exact_prefix_equal_positions_and_tokens_reproduced_in_order():
    from benchmarks.long_generation import compare_to_reference

    assert compare_to_reference([1, 2, 3, 4], [1, 2, 3, 4]) == {"prefix_tokens": 4, "agreement": 100.0, "matched": 100.0}
    assert compare_to_reference([1, 2, 9, 4], [1, 2, 3, 4]) == {"prefix_tokens": 2, "agreement": 75.0, "matched": 75.0}
    # a copy that skips one token: every later position differs, but the tokens are all there in order
    assert compare_to_reference([1, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8]) == {
        "prefix_tokens": 1, "agreement": 12.5, "matched": 87.5,
    }
    with pytest.raises(ValueError, match="equal lengths"):
        compare_to_reference([1, 2], [1, 2, 3])


def test_copy_prompt_is_the_passage_then_the_instruction_then_its_cue(tokenizer):
    from benchmarks.long_generation import CONFIGS, COPY_INSTRUCTION, copy_samples

    config = CONFIGS["smoke"]
    (sample,) = copy_samples(config, tokenizer)
    instruction = tokenizer.encode(COPY_INSTRUCTION, add_special_tokens=False)
    passage = sample.prompt[: config.copy_tokens]
    assert sample.prompt == passage + instruction + passage[: config.copy_cue]
    assert sample.reference == passage[config.copy_cue :] and sample.new_tokens == len(sample.reference)


def test_judgeq_then_gkv_gets_the_judgeq_artifact():
    from benchmarks.common import Setting
    from judgeq_vllm.policies import KVBudget

    setting = Setting("judgeq+gkv", KVBudget(tokens=256), decode_interval=64)
    assert setting.server_flags("soft.safetensors") == [
        "--kv-eviction", "judgeq+gkv", "--kv-budget", "256", "--kv-decode-interval", "64",
        "--judgeq-soft-tokens", "soft.safetensors",
    ]
    section = setting.eviction_kwargs("soft.safetensors")["additional_config"]["judgeq"]
    assert section["soft_tokens"] == "soft.safetensors" and section["kv_decode_interval"] == 64


def test_smoke_result_scores_every_setting_on_both_tasks(long_generation_smoke):
    path, report = long_generation_smoke
    assert report["kind"] == "long-generation" and report["vllm"] == "0.26.0" and report["device"].startswith("cpu")
    assert report["decode_interval"] == 32 and report["budgets"] == [64]
    results = {r["setting"]: r for r in report["results"]}
    assert list(results) == ["vanilla", "gkv@64", "streamingllm-decode@64"]
    for result in results.values():
        for task in ("copy", "continuation"):
            summary = result["tasks"][task]
            for score in ("agreement", "matched"):
                assert all(0 <= s[score] <= 100 for s in summary["samples"])
                assert summary[score] == round(sum(s[score] for s in summary["samples"]) / len(summary["samples"]), 2)
            assert len(summary["outputs"]) == len(summary["samples"])
    # full KV is the continuation's reference; both policies compact during decoding (interval 32,
    # 96 tokens), on the same schedule
    assert results["vanilla"]["tasks"]["continuation"]["agreement"] == 100.0
    assert results["vanilla"]["tasks"]["continuation"]["prefix_tokens"] == 96
    assert results["gkv@64"]["eviction"]["decode_compactions"] >= 3
    streaming = results["streamingllm-decode@64"]["eviction"]
    assert streaming["decode_compactions"] == results["gkv@64"]["eviction"]["decode_compactions"]
    assert "| full KV | " in path.with_suffix(".md").read_text()
    assert report["plots"] == [f"{path.stem}.png"]
    assert (path.parent / report["plots"][0]).read_bytes()[:4] == b"\x89PNG"
