"""Near-tie analysis of kept-set differences between the engine and the HF reference."""

from __future__ import annotations

import torch

from judgeq_vllm.policies import EvictionPolicy, ScoreInputs


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
