"""Hit rate: how much of what the response will attend to does a policy keep?

For a held-out prompt, the *reference* set of a (layer, kv head) at budget ``k`` is the
top-``k`` prompt positions of the model's own response's attention: the response tokens'
softmax rows over the prompt, summed over the response tokens and over the query heads of
the GQA group (no pooling). A policy's kept set comes from the project's policy code, the
very selection that is served (``EvictionPolicy.select``: Judge Q's soft-token
attention, or SnapKV's last-32-token window, max-pooled with kernel 7; SnapKV's window is
kept and counts towards ``k``). The hit rate is ``|kept ∩ reference| / k``, averaged
over layers, kv heads and prompts; a prompt not longer than ``k`` is not evicted at all
and is left out of that budget.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..policies import EvictionPolicy, ObservationSource, ScoreInputs
from ..soft_tokens import SoftTokens
from .attention_maps import mean_prompt_attention
from .forward import attention_scale, prefill, soft_token_forward, truncated_cache
from .progress import progress
from .trainer import TrainingSample

DEFAULT_BUDGETS = (128, 256, 512)


@dataclass
class PromptObservation:
    """One prompt's per-layer inputs to every policy and its reference scores (CPU, fp32).

    Attributes:
        prompt_len: tokens in the prompt.
        response_scores: per layer, ``[num_kv_heads, prompt_len]`` summed response attention.
        inputs: per policy name, per layer, what the policy scores.
    """

    prompt_len: int
    response_scores: list[torch.Tensor]
    inputs: dict[str, list[ScoreInputs]] = field(default_factory=dict)


def observe_prompt(
    model: torch.nn.Module, sample: TrainingSample, policies: Mapping[str, EvictionPolicy]
) -> PromptObservation:
    """Runs prompt + response once, and each soft-token policy's soft tokens on the prompt's KV."""
    prompt_len = len(sample.prompt_ids)
    scale = attention_scale(model)
    num_layers = model.config.num_hidden_layers
    window = max(
        (policy.num_observations for policy in policies.values() if policy.observation_source == ObservationSource.PROMPT_WINDOW),
        default=0,
    )
    window = min(window, prompt_len)
    response_scores: dict[int, torch.Tensor] = {}
    window_inputs: dict[int, ScoreInputs] = {}

    def record_prefill(layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        mean = mean_prompt_attention(query[:, prompt_len:], key, prompt_len, scale)
        num_kv_heads = key.shape[0]
        # the mean over the response tokens ranks positions as their sum does; then the
        # query heads of each GQA group are summed
        response_scores[layer] = mean.reshape(num_kv_heads, -1, prompt_len).sum(dim=1).cpu()
        if window:
            window_query = query[:, prompt_len - window : prompt_len]
            window_inputs[layer] = _inputs(window_query, key[:, :prompt_len], prompt_len, scale, layer, num_layers)

    cache = prefill(model, sample.prompt_ids + sample.response_ids, record_prefill)
    observation = PromptObservation(prompt_len, [response_scores[layer] for layer in range(num_layers)])
    for name, policy in policies.items():
        if policy.observation_source == ObservationSource.PROMPT_WINDOW:
            observation.inputs[name] = [window_inputs[layer] for layer in range(num_layers)]
        elif policy.observation_source == ObservationSource.SOFT_TOKENS:
            soft_inputs: dict[int, ScoreInputs] = {}

            def record_soft(layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
                soft_inputs[layer] = _inputs(query, key, prompt_len, scale, layer, num_layers)

            with torch.no_grad():
                soft_token_forward(model, policy.soft_tokens.embeddings, truncated_cache(cache, prompt_len, model.config), record_soft)
            observation.inputs[name] = [soft_inputs[layer] for layer in range(num_layers)]
        else:
            raise ValueError(f"hit rate is defined for query-based policies; {name!r} uses none")
    return observation


def _inputs(query: torch.Tensor, key: torch.Tensor, prompt_len: int, scale: float, layer: int, num_layers: int) -> ScoreInputs:
    # the policies take [n_obs, num_q_heads, head_dim] queries, on the CPU, as the reference does
    return ScoreInputs(
        queries=query.permute(1, 0, 2).float().cpu(),
        keys=key.float().cpu(),
        num_candidates=prompt_len,
        scale=scale,
        layer_idx=layer,
        num_layers=num_layers,
    )


def layer_overlap(kept: torch.Tensor, reference_scores: torch.Tensor) -> torch.Tensor:
    """Per kv head, the share of the reference top-k that ``kept`` holds.

    Args:
        kept: ``[num_kv_heads, k]`` kept token indices.
        reference_scores: ``[num_kv_heads, n]``; its top-``k`` per head is the reference.

    Returns:
        ``[num_kv_heads]`` fp32 in ``[0, 1]``.
    """
    num_kv_heads, k = kept.shape
    reference = reference_scores.topk(k, dim=-1).indices
    in_kept = torch.zeros_like(reference_scores, dtype=torch.bool).scatter_(1, kept, True)
    return in_kept.gather(1, reference).float().sum(dim=1) / k


def prompt_hit_rates(
    observation: PromptObservation, policies: Mapping[str, EvictionPolicy], budget: int
) -> dict[str, float] | None:
    """Each policy's hit rate on one prompt at ``budget``; ``None`` if the prompt fits it."""
    if observation.prompt_len <= budget:
        return None
    rates = {}
    for name, policy in policies.items():
        per_layer = [
            layer_overlap(policy.select(inputs, budget), scores).mean()
            for inputs, scores in zip(observation.inputs[name], observation.response_scores)
        ]
        rates[name] = float(torch.stack(per_layer).mean())
    return rates


def evaluate_hit_rates(
    model: torch.nn.Module,
    samples: Sequence[TrainingSample],
    policies: Mapping[str, EvictionPolicy],
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    show_progress: bool = True,
) -> dict[str, dict]:
    """Hit rates of every policy at every budget, averaged over the prompts longer than it.

    Returns:
        ``{str(budget): {"n_prompts": n, <policy name>: mean hit rate or None, ...}}``.
    """
    per_budget: dict[int, list[dict[str, float]]] = {budget: [] for budget in budgets}
    bar = progress(len(samples), "hit rate", enabled=show_progress)
    for sample in samples:
        if len(sample.prompt_ids) > min(budgets):
            observation = observe_prompt(model, sample, policies)
            for budget in budgets:
                rates = prompt_hit_rates(observation, policies, budget)
                if rates is not None:
                    per_budget[budget].append(rates)
        bar.update()
    bar.close()
    results = {}
    for budget, rows in per_budget.items():
        results[str(budget)] = {"n_prompts": len(rows)}
        for name in policies:
            results[str(budget)][name] = statistics.fmean(row[name] for row in rows) if rows else None
    return results


def hit_rate_policies(soft_tokens: SoftTokens, untrained: SoftTokens | None) -> dict[str, EvictionPolicy]:
    """Judge Q with the trained soft tokens, SnapKV (window 32), and optionally Judge Q with
    the untrained initialisation of the same run as a control; served defaults (pool 7)."""
    from ..policies import JudgeQPolicy, SnapKVPolicy

    policies: dict[str, EvictionPolicy] = {"judgeq": JudgeQPolicy(soft_tokens=soft_tokens), "snapkv": SnapKVPolicy(window=32)}
    if untrained is not None:
        policies["judgeq_untrained"] = JudgeQPolicy(soft_tokens=untrained)
    return policies


def plot_hit_rates(results: Mapping[str, dict], title: str, path: str) -> None:
    """A grouped bar chart (one group per budget, one bar per policy) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(results)
    names = [name for name in next(iter(results.values())) if name != "n_prompts"]
    width = 0.8 / len(names)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for index, name in enumerate(names):
        values = [results[budget][name] or 0.0 for budget in budgets]
        axes.bar([b + (index - (len(names) - 1) / 2) * width for b in range(len(budgets))], values, width, label=name)
    axes.set_xticks(range(len(budgets)), [f"{budget}\n(n={results[budget]['n_prompts']})" for budget in budgets])
    axes.set_xlabel("KV budget (tokens per head)")
    axes.set_ylabel("hit rate")
    axes.set_ylim(0, 1)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
