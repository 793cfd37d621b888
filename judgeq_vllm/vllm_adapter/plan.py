"""The per-request eviction plan: one formula sheet shared by the scheduler and the workers.

NOTE on the model (docs/engine-design.md §2). vLLM keeps counting a request as if nothing
were evicted: with ``P`` prompt tokens and ``n`` soft tokens appended by the scheduler,
its prompt length is ``L' = P + n`` and every later token ``p >= L'`` keeps its vLLM
position. Physically, the step whose prefill chunk ends at ``L'`` (the *compaction step*)
scores the prompt and moves every (layer, kv head)'s ``k`` kept rows to logical slots
``[S, S + k)`` of the request's own blocks, ``S`` block aligned; the head blocks
``[0, S / bs)`` then hold nothing the request reads and go back to the pool. After that
step, a token at vLLM position ``p >= L'`` is computed at RoPE position ``p - n``, its KV
goes to logical slot ``p - delta`` and attention reads ``k + (p - L' + 1)`` rows starting
at block ``S / bs``.

Compress, then ask (a per-request compression boundary ``N``): only the first ``N``
prompt tokens (a document, a system prompt) are eviction candidates, the soft tokens go
right after them, and the ``Q = P - N`` tokens after the boundary (the question) follow
the soft tokens untouched. The plan then describes the candidates only (``prompt_len =
N``, ``L' = N + n``); the question is prefilled after the compaction step under the same
``p >= L'`` rules as generated tokens (RoPE ``p - n``, slot ``p - delta``), so the worker
needs nothing new. vLLM's prompt length is ``L' + Q``.

Per-layer budgets (PyramidKV): blocks are shared by all layers, so allocation and
freeing follow the largest layer's count ``k = max_l k_l``. Layer ``l`` keeps its
``k_l`` rows at ``[S, S + k_l)`` and writes later tokens right after them, at slot
``p - delta_l`` with ``delta_l = L' - S - k_l >= delta``: each layer gets its own slot
mapping and attention length, never its own blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policies import EvictionPolicy, KVBudget, ObservationSource


@dataclass(frozen=True)
class EvictionPlan:
    """What happens to one request; decided once, when the scheduler admits it.

    Attributes:
        prompt_len: the eviction candidates: the user's prompt (``P``), or its first ``N``
            tokens when the request sets a compression boundary.
        num_soft: ``n``, soft tokens appended after the prompt (Judge Q), else 0.
        num_observations: queries the policy scores with: the soft tokens, or the last
            ``min(window, P)`` prompt tokens, or none.
        budget_keep: the request's budget in tokens per head (``KVBudget.keep_count(P)``),
            what ``EvictionPolicy.select`` is called with.
        layer_keeps: ``k_l``, rows kept per kv head in each layer (equal for every
            layer except with per-layer budgets).
        block_size: KV-cache block size.
        suffix_len: prompt tokens after the boundary (the question), placed after the soft
            tokens and never evicted; 0 without a boundary.
    """

    prompt_len: int
    num_soft: int
    num_observations: int
    budget_keep: int
    layer_keeps: tuple[int, ...]
    block_size: int
    suffix_len: int = 0

    @property
    def keep(self) -> int:
        """``k``: the largest layer's kept rows, what the blocks are sized for."""
        return max(self.layer_keeps)

    @property
    def uniform(self) -> bool:
        """Whether every layer keeps ``k`` rows (one slot mapping serves all layers)."""
        return min(self.layer_keeps) == self.keep

    @property
    def total_len(self) -> int:
        """``L'``: candidates plus soft tokens, where the compaction step's chunk ends (and
        vLLM's prompt length, unless a question follows the boundary)."""
        return self.prompt_len + self.num_soft

    @property
    def num_prompt_tokens(self) -> int:
        """vLLM's prompt length: candidates, soft tokens and the question after them."""
        return self.total_len + self.suffix_len

    @property
    def first_kept_slot(self) -> int:
        """``S``: logical slot of the first kept row, block aligned."""
        return (self.total_len - self.keep) // self.block_size * self.block_size

    @property
    def slot_shift(self) -> int:
        """``delta``: a token at vLLM position ``p >= L'`` is stored at logical slot ``p - delta``
        (in every layer that keeps ``k`` rows)."""
        return self.total_len - self.first_kept_slot - self.keep

    def layer_slot_shift(self, layer: int) -> int:
        """``delta_l``: layer ``layer`` stores the token at vLLM position ``p >= L'`` at slot ``p - delta_l``."""
        return self.total_len - self.first_kept_slot - self.layer_keeps[layer]

    def layer_evicted_len(self, layer: int) -> int:
        """``L' - k_l``: how many fewer rows layer ``layer``'s attention reads after compaction."""
        return self.total_len - self.layer_keeps[layer]

    @property
    def freed_blocks(self) -> int:
        """Head blocks returned to the pool after the compaction step."""
        return self.first_kept_slot // self.block_size

    @property
    def last_chunk_start(self) -> int:
        """The chunk that ends the prompt must start at or before this position: it holds the
        last real prompt token (for the first sampled token) and every observation query."""
        return self.total_len - self.num_observations - 1

    @property
    def prefix_hit_cap(self) -> int:
        """Longest prefix-cache hit allowed: it must leave the destination blocks private
        and the observation span to be recomputed (its queries are scored)."""
        return min(self.first_kept_slot, max(self.last_chunk_start, 0) // self.block_size * self.block_size)


def observation_count(policy: EvictionPolicy, prompt_len: int) -> int:
    """Observation queries the policy scores a prompt of ``prompt_len`` tokens with."""
    if policy.observation_source == ObservationSource.PROMPT_WINDOW:
        return min(policy.num_observations, prompt_len)
    if policy.observation_source == ObservationSource.SOFT_TOKENS:
        return policy.num_observations
    return 0


def plan_request(
    prompt_len: int, policy: EvictionPolicy, budget: KVBudget, block_size: int, num_layers: int, suffix_len: int = 0
) -> EvictionPlan | None:
    """The plan for ``prompt_len`` candidate tokens followed by ``suffix_len`` kept ones
    (a question after a compression boundary), or ``None`` when the candidates fit the budget."""
    if not budget.evicts(prompt_len):
        return None
    budget_keep = budget.keep_count(prompt_len)
    layer_keeps = tuple(policy.layer_keep_count(budget_keep, prompt_len, layer, num_layers) for layer in range(num_layers))
    num_soft = policy.num_observations if policy.observation_source == ObservationSource.SOFT_TOKENS else 0
    return EvictionPlan(
        prompt_len=prompt_len,
        num_soft=num_soft,
        num_observations=observation_count(policy, prompt_len),
        budget_keep=budget_keep,
        layer_keeps=layer_keeps,
        block_size=block_size,
        suffix_len=suffix_len,
    )
