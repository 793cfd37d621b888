"""benchmarks.needle: haystacks of the asked length and depth, scoring, and the CPU smoke run."""

import gzip
import json


def test_needle_sits_at_a_sentence_start_near_its_depth(tokenizer):
    from benchmarks.needle import NEEDLE, needle_sample
    from benchmarks.quality import chat_prompt
    from judgeq_vllm.assets.corpora import paul_graham_essays

    haystack = tokenizer.encode("\n\n".join(paul_graham_essays().values())[:20000], add_special_tokens=False)
    for depth in (0, 40, 100):
        sample = needle_sample(tokenizer, haystack, 1000, depth, max_new_tokens=12)
        assert abs(len(chat_prompt(tokenizer, sample).ids) - 1000) <= 4
        context = sample["context"]
        at = context.index(NEEDLE.strip())
        assert context.count(NEEDLE.strip()) == 1
        assert context[:at].strip() == "" or context[:at].rstrip().endswith(".")
        # moved back from depth% of the context to the sentence start before it
        assert at / len(context) <= depth / 100 + 0.02 and (depth == 0 or at / len(context) > depth / 100 - 0.2)


def test_score_is_the_share_of_key_phrases():
    from benchmarks.needle import REFERENCES, score_answer

    assert score_answer(" to eat a sandwich and sit in Dolores Park.", REFERENCES) == 100.0
    assert score_answer(" to eat a Sandwich by the bay.", REFERENCES) == 50.0
    assert score_answer(" the Golden Gate Bridge.", REFERENCES) == 0.0


def test_prepared_samples_cover_the_grid(needle_data):
    with gzip.open(needle_data, "rt") as handle:
        samples = json.load(handle)["samples"]
    assert sorted((s["length"], s["depth"]) for s in samples) == [(n, d) for n in (400, 800) for d in (0, 50, 100)]


def test_smoke_result_has_a_grid_per_setting_and_protocol(needle_smoke):
    path, report = needle_smoke
    assert report["kind"] == "needle" and report["vllm"] == "0.26.0" and report["device"].startswith("cpu")
    results = {(r["setting"], r["protocol"]): r for r in report["results"]}
    assert set(results) == {("vanilla", "full"), ("snapkv@128", "query_aware"), ("snapkv@128", "query_agnostic")}
    for result in results.values():
        assert len(result["grid"]) == 6 and all(0 <= point["score"] <= 100 for point in result["grid"])
        assert result["average"] == round(sum(point["score"] for point in result["grid"]) / 6, 2)
        assert result["eviction"]["requests_evicted"] == (0 if result["policy"] == "vanilla" else 6)
    # with full KV the model finds the needle in most of these short haystacks
    assert results[("vanilla", "full")]["average"] >= 50
    markdown = path.with_suffix(".md").read_text()
    assert "| full KV | full | " in markdown and "## snapkv@128, query_agnostic" in markdown
    assert "| 50% | " in markdown
    assert report["plots"] == [f"{path.stem}-query_aware.png", f"{path.stem}-query_agnostic.png"]
    for name in report["plots"]:
        assert (path.parent / name).read_bytes()[:4] == b"\x89PNG"
