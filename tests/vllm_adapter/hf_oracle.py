"""``judgeq_vllm.reference.generate`` for several (policy, budget) pairs off one prefill.

NOTE: the engine tests compare 10 (policy, budget) configurations on 16 prompts; running
``generate`` for each would prefill every prompt 10 times in HF (about 15 min on 2
cores). Prefill and the recorded queries/keys do not depend on the policy (apart from
Judge Q's soft tokens, which get a prefill of their own), so this runs one recorded
prefill per prompt and then, per configuration, exactly what ``generate`` does after
its prefill: ``policy.select`` per layer, the same cache compression, greedy decoding.
``test_oracle_helper_equals_generate`` checks it against ``generate`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from judgeq_vllm.policies import EvictionPolicy, KVBudget, ObservationSource, ScoreInputs
from judgeq_vllm.reference import EvictionResult
from judgeq_vllm.reference import hf

WINDOW_CAP = 32  # most observation queries any window policy of the tests uses


@dataclass
class RecordedPrefill:
    """The queries and keys one HF prefill recorded, per layer."""

    queries: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]
    prompt_len: int
    scale: float
    num_layers: int

    def score_inputs(self, policy: EvictionPolicy, layer: int) -> ScoreInputs:
        num_obs = hf._observation_count(policy, self.prompt_len)
        queries = self.queries[layer]
        assert num_obs <= queries.shape[0]
        return ScoreInputs(
            queries=queries[queries.shape[0] - num_obs :],
            keys=self.keys[layer],
            num_candidates=self.prompt_len,
            scale=self.scale,
            layer_idx=layer,
            num_layers=self.num_layers,
        )


@torch.inference_mode()
def generate_many(
    model, prompt_ids: list[int], configs: list[tuple[EvictionPolicy, KVBudget]], max_new_tokens: int
) -> tuple[list[EvictionResult], RecordedPrefill]:
    """One result per ``(policy, budget)``, and the recorded prefill; every policy must
    share one observation source kind (all soft-token, or none of them)."""
    soft = {policy.observation_source == ObservationSource.SOFT_TOKENS for policy, _ in configs}
    assert len(soft) == 1, "soft-token and prompt-window policies need separate prefills"
    prompt_len = len(prompt_ids)
    ids = torch.tensor([prompt_ids])
    embeds = model.get_input_embeddings()(ids)
    first_policy = configs[0][0]
    if soft.pop():
        embeds = torch.cat([embeds, hf._soft_token_embeddings(model, first_policy)], dim=1)
        num_recorded = first_policy.num_observations
    else:
        num_recorded = min(WINDOW_CAP, prompt_len)
    seq_len = embeds.shape[1]
    cache = hf.DynamicCache(config=model.config)
    with hf._recording(num_recorded) as recorder:
        out = model(
            inputs_embeds=embeds,
            position_ids=torch.arange(seq_len)[None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=torch.tensor([prompt_len - 1]),
        )
    first_token = int(out.logits[0, -1].argmax())
    full_kv = [(layer.keys, layer.values) for layer in cache.layers]
    stop = hf._stop_ids(model, None)
    recorded = RecordedPrefill(
        recorder.queries, recorder.keys, prompt_len, model.model.layers[0].self_attn.scaling, len(cache.layers)
    )
    results = []
    for policy, budget in configs:
        for layer, (keys, values) in zip(cache.layers, full_kv):
            layer.keys, layer.values = keys, values
        keep = budget.keep_count(prompt_len)
        kept = None
        if keep < prompt_len:
            kept = [policy.select(recorded.score_inputs(policy, layer), keep) for layer in range(len(cache.layers))]
            hf._compress_cache(cache, kept)
        elif seq_len > prompt_len:
            # no eviction: generate would not have appended the soft tokens at all
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :prompt_len], layer.values[:, :, :prompt_len]
        cache_lengths = [layer.keys.shape[2] for layer in cache.layers]
        token, tokens, position = first_token, [first_token], prompt_len
        while len(tokens) < max_new_tokens and token not in stop:
            step = model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[position]]),
                past_key_values=cache,
                use_cache=True,
            )
            token = int(step.logits[0, -1].argmax())
            tokens.append(token)
            position += 1
        results.append(EvictionResult(tokens, prompt_len, kept, cache_lengths, list(range(prompt_len, prompt_len + len(tokens)))))
    return results, recorded


def near_tie_differences(
    policy: EvictionPolicy, inputs: ScoreInputs, engine_kept: torch.Tensor, reference_kept: torch.Tensor
) -> list[tuple[int, int, float, float]]:
    """Per kv head where the kept sets differ: ``(head, token, score, threshold)`` for every
    token in the symmetric difference whose HF score is *not* within a near-tie of the
    selection threshold (the lowest scored token HF kept). Empty means every difference
    is a near-tie."""
    scores = policy.score(inputs)
    protected = policy.protected_mask(inputs.num_candidates)
    far = []
    for head in range(engine_kept.shape[0]):
        engine_set, reference_set = set(engine_kept[head].tolist()), set(reference_kept[head].tolist())
        if engine_set == reference_set:
            continue
        free = [t for t in reference_set if not protected[t]]
        threshold = float(scores[head, free].min())
        for token in engine_set ^ reference_set:
            score = float(scores[head, token])
            if abs(score - threshold) > 1e-4 * abs(threshold) + 1e-6:
                far.append((head, token, score, threshold))
    return far
