"""Per-request settings, the compress-then-ask plan, the counters and their Prometheus form, without an engine."""

import pytest
from vllm.exceptions import VLLMValidationError

from judgeq_vllm.policies import KVBudget, make_policy
from judgeq_vllm.vllm_adapter.plan import plan_request
from judgeq_vllm.vllm_adapter.request_settings import RequestSettings, check_request
from judgeq_vllm.vllm_adapter.stats import EvictionStats, Histogram

BLOCK = 16


def test_no_settings_means_the_engines():
    assert RequestSettings.parse(None, "snapkv") == RequestSettings()
    # vLLM's own extra_args, including those sharing our prefix, are left alone
    assert RequestSettings.parse({"kv_transfer_params": {}, "kv_cache_report_mode": "x", "other": 1}, "snapkv") == RequestSettings()


def test_settings_parse():
    settings = RequestSettings.parse({"kv_eviction": "snapkv", "kv_budget": "0.5", "kv_compress_prefix": 300}, "snapkv")
    assert settings == RequestSettings(enabled=True, budget=KVBudget(ratio=0.5), compress_prefix=300)
    assert not RequestSettings.parse({"kv_eviction": "none"}, "snapkv").enabled
    assert RequestSettings.parse({"kv_budget": 128}, "judgeq").budget == KVBudget(tokens=128)


@pytest.mark.parametrize(
    "extra_args, parameter, message",
    [
        ({"kv_budget": 1.5}, "kv_budget", "compression ratio must be in [0, 1)"),
        ({"kv_budget": True}, "kv_budget", "must be a number"),
        ({"kv_budget": [64]}, "kv_budget", "kv_budget:"),
        ({"kv_eviction": "h2o"}, "kv_eviction", "'none' (no eviction for this request) or 'snapkv'"),
        ({"kv_compress_prefix": 0}, "kv_compress_prefix", "positive whole number"),
        ({"kv_compress_prefix": "12"}, "kv_compress_prefix", "positive whole number"),
        ({"kv_window": 8}, "kv_window", "unknown per-request eviction setting 'kv_window'"),
    ],
)
def test_bad_settings_name_the_parameter(extra_args, parameter, message):
    with pytest.raises(VLLMValidationError) as refused:
        RequestSettings.parse(extra_args, "snapkv")
    assert refused.value.parameter == f"vllm_xargs.{parameter}"
    assert message in str(refused.value)


def test_boundary_is_checked_against_the_prompt():
    assert check_request({"kv_compress_prefix": 100}, "snapkv", 100).compress_prefix == 100
    assert check_request({"kv_compress_prefix": 101}, "snapkv", None).compress_prefix == 101  # length unknown yet
    with pytest.raises(VLLMValidationError, match="lies beyond the prompt's 100 tokens"):
        check_request({"kv_compress_prefix": 101}, "snapkv", 100)


def test_compress_then_ask_plans_the_document_only():
    """The plan covers the candidates; the question only lengthens vLLM's prompt."""
    policy = make_policy("snapkv")
    whole = plan_request(400, policy, KVBudget(tokens=64), BLOCK, num_layers=30)
    document = plan_request(400, policy, KVBudget(tokens=64), BLOCK, num_layers=30, suffix_len=37)
    assert document.num_prompt_tokens == whole.num_prompt_tokens + 37 == 437
    # where compaction happens and what it frees do not depend on the question
    for field in ("total_len", "first_kept_slot", "slot_shift", "freed_blocks", "prefix_hit_cap", "last_chunk_start"):
        assert getattr(document, field) == getattr(whole, field), field
    # a document that fits the budget is not evicted, whatever follows it
    assert plan_request(60, policy, KVBudget(tokens=64), BLOCK, num_layers=30, suffix_len=500) is None


def test_histogram_buckets_are_upper_bounds():
    histogram = Histogram((0.5, 1.0))
    for value in (0.5, 0.7, 1.0, 3.0):
        histogram.observe(value)
    assert histogram.as_dict() == {"bounds": [0.5, 1.0], "counts": [1, 2, 1], "sum": 5.2, "count": 4}


def test_stats_count_requests_by_policy_and_render_for_prometheus():
    from prometheus_client.core import CollectorRegistry
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from judgeq_vllm.vllm_adapter.metrics import EvictionCollector

    stats = EvictionStats()
    stats.record_admission("snapkv", None)
    stats.record_admission("snapkv", "off_by_request")
    plan = plan_request(400, make_policy("snapkv"), KVBudget(tokens=100), BLOCK, num_layers=30)
    stats.record_compaction(plan, blocks_freed=plan.freed_blocks)
    stats.record_decode_compaction(rows_evicted=32, blocks_freed=2)
    stats.eviction_seconds.observe(0.02)
    collector = EvictionCollector("m")
    registry = CollectorRegistry()
    registry.register(collector)
    assert generate_latest(registry) == b""  # nothing before the first poll answers
    collector.snapshot = {**stats.as_dict(), "kv_free_blocks": 10, "kv_total_blocks": 12}
    samples = {
        (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("engine", "model_name")))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert all(
        sample.labels["model_name"] == "m" and sample.labels["engine"] == "0"
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    )
    expected = {
        ("judgeq:requests_total", (("policy", "snapkv"),)): 1,
        ("judgeq:requests_total", (("policy", "none"),)): 1,
        ("judgeq:requests_skipped_total", (("reason", "off_by_request"),)): 1,
        ("judgeq:compactions_total", ()): 1,
        ("judgeq:tokens_evicted_total", ()): 300,
        ("judgeq:blocks_freed_total", ()): plan.freed_blocks + 2,
        ("judgeq:decode_compactions_total", ()): 1,
        ("judgeq:decode_rows_evicted_total", ()): 32,
        # 300 of 400 tokens removed: 0.75
        ("judgeq:compression_ratio_bucket", (("le", "0.7"),)): 0,
        ("judgeq:compression_ratio_bucket", (("le", "0.8"),)): 1,
        ("judgeq:compression_ratio_bucket", (("le", "+Inf"),)): 1,
        ("judgeq:eviction_step_seconds_bucket", (("le", "0.01"),)): 0,
        ("judgeq:eviction_step_seconds_bucket", (("le", "0.025"),)): 1,
        ("judgeq:eviction_step_seconds_sum", ()): 0.02,
        ("judgeq:kv_free_blocks", ()): 10,
        ("judgeq:kv_total_blocks", ()): 12,
    }
    assert {key: samples.get(key) for key in expected} == expected
