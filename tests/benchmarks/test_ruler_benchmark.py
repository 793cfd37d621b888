"""benchmarks.ruler and the quality protocols: prompts, requests, and the CPU smoke run."""

import pytest

from judgeq_vllm.policies import KVBudget

SAMPLE = {
    "context": "Some special magic numbers are hidden within the following text. One of them is: 42.\n",
    "question": "What is the special magic number?",
    "answer_prefix": " The special magic number is",
    "outputs": ["42"],
    "max_new_tokens": 8,
}


def test_chat_prompt_splits_where_the_context_ends(tokenizer):
    from benchmarks.quality import chat_prompt

    prompt = chat_prompt(tokenizer, SAMPLE)
    head = tokenizer.decode(prompt.ids[: prompt.context_len])
    rest = tokenizer.decode(prompt.ids[prompt.context_len :])
    assert head.startswith("<|im_start|>system") and head.endswith(SAMPLE["context"])
    assert rest.startswith(SAMPLE["question"]) and rest.endswith("<|im_start|>assistant\n" + SAMPLE["answer_prefix"])


def test_protocols_set_the_compression_boundary_only_query_agnostic(tokenizer):
    from benchmarks.common import Setting
    from benchmarks.quality import chat_prompt, engine_request

    prompt = chat_prompt(tokenizer, SAMPLE)
    policy = Setting("snapkv", KVBudget(ratio=0.5))
    aware_prompt, aware = engine_request(prompt, policy, "query_aware", 8)
    _, agnostic = engine_request(prompt, policy, "query_agnostic", 8)
    _, vanilla = engine_request(prompt, Setting(), "query_agnostic", 8)
    assert aware_prompt["prompt_token_ids"] == prompt.ids
    assert aware.extra_args == {"kv_budget": 0.5} and aware.temperature == 0.0 and aware.max_tokens == 8
    assert agnostic.extra_args == {"kv_budget": 0.5, "kv_compress_prefix": prompt.context_len}
    assert vanilla.extra_args is None
    with pytest.raises(ValueError, match="unknown protocol"):
        engine_request(prompt, policy, "two_turn", 8)


def test_generated_length_leaves_room_for_template_soft_tokens_and_answer():
    from benchmarks.ruler import LENGTH_SLACK, generator_seq_len

    assert generator_seq_len(4096, "niah_single_1", 30) == 4096 - 30 - 32 - LENGTH_SLACK
    # fwe may overshoot RULER's length by its answer (50 tokens)
    assert generator_seq_len(4096, "fwe", 30) == 4096 - 30 - 32 - LENGTH_SLACK - 50


def test_smoke_result_scores_every_cell_with_the_engines_counters(ruler_smoke, tokenizer):
    path, report = ruler_smoke
    assert report["kind"] == "ruler" and report["vllm"] == "0.26.0" and report["device"].startswith("cpu")
    cells = {(r["setting"], r["protocol"]): r for r in report["results"]}
    assert set(cells) == {("vanilla", "full")} | {
        (setting, protocol) for setting in ("snapkv@128", "snapkv@r0.5") for protocol in ("query_aware", "query_agnostic")
    }
    for cell in cells.values():
        assert cell["seq_len"] == 1024 and set(cell["scores"]) == {"niah_single_1"}
        assert 0 <= cell["average"] <= 100
        expected_evictions = 0 if cell["policy"] == "vanilla" else 2
        assert cell["eviction"]["requests_evicted"] == expected_evictions and not cell["eviction"]["requests_skipped"]
    # the full-KV model finds the needle at 1K tokens: prompts, template and scoring are right
    assert cells[("vanilla", "full")]["average"] >= 50
    # query-agnostic compresses the context only: fewer prompt tokens go through eviction
    for setting in ("snapkv@128", "snapkv@r0.5"):
        aware = cells[(setting, "query_aware")]["eviction"]["prompt_tokens"]
        agnostic = cells[(setting, "query_agnostic")]["eviction"]["prompt_tokens"]
        assert 0 < agnostic < aware


def test_smoke_query_agnostic_evicts_exactly_the_contexts(ruler_smoke, tokenizer):
    import gzip
    import json

    from benchmarks.quality import chat_prompt

    _, report = ruler_smoke
    with gzip.open(report["data"]["path"], "rt") as handle:
        samples = json.load(handle)["seq_lens"]["1024"]["samples"]
    prompts = [chat_prompt(tokenizer, sample) for sample in samples[:2]]
    cells = {(r["setting"], r["protocol"]): r["eviction"] for r in report["results"]}
    assert cells[("snapkv@128", "query_agnostic")]["prompt_tokens"] == sum(p.context_len for p in prompts)
    assert cells[("snapkv@128", "query_aware")]["prompt_tokens"] == sum(len(p.ids) for p in prompts)
    # ratio 0.5 removes half of each compressed span
    assert cells[("snapkv@r0.5", "query_agnostic")]["tokens_evicted"] == sum(p.context_len - p.context_len // 2 for p in prompts)


def test_smoke_tables_and_plot(ruler_smoke):
    path, report = ruler_smoke
    markdown = path.with_suffix(".md").read_text()
    assert "## 1024 tokens, query_aware" in markdown and "## 1024 tokens, query_agnostic" in markdown
    assert "| full KV | " in markdown and "| snapkv@r0.5 | " in markdown
    assert report["plots"] == [f"{path.stem}-1024.png"]
    assert (path.parent / report["plots"][0]).read_bytes()[:4] == b"\x89PNG"
