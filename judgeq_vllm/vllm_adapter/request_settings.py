"""Per-request eviction settings, carried by vLLM's ``SamplingParams.extra_args``.

A client changes, for one request, what the engine's ``--kv-eviction`` flags set:

| key | value | meaning |
|---|---|---|
| ``kv_eviction`` | ``"none"``, or the server's policy name | serve this request without eviction, or with it (the default) |
| ``kv_budget`` | tokens (``256``) or a ratio removed (``0.75``) | this request's budget instead of ``--kv-budget`` |
| ``kv_compress_prefix`` | ``N``, ``1 <= N <= prompt length`` | compress, then ask: only the first ``N`` prompt tokens are evicted; the soft tokens go after them and the rest (the question) is kept whole |

Through the OpenAI API they ride in ``vllm_xargs`` (``extra_body={"vllm_xargs": {...}}``
with the ``openai`` client); offline, ``SamplingParams(extra_args={...})``.

NOTE on where they are checked. The front end checks every request before it reaches
EngineCore (:func:`check_request`, called by the hooks in ``frontend.py``), so a bad
value is a ``VLLMValidationError``: HTTP 400 from the OpenAI server, ``ValueError`` from
``LLM.generate``. The scheduler parses the same values again and never raises: EngineCore
has no per-request error path, an exception there stops the engine for every client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from vllm.exceptions import VLLMValidationError

from ..policies import KVBudget
from .config import NO_EVICTION

EVICTION_KEY = "kv_eviction"
BUDGET_KEY = "kv_budget"
COMPRESS_PREFIX_KEY = "kv_compress_prefix"
SETTING_KEYS = (EVICTION_KEY, BUDGET_KEY, COMPRESS_PREFIX_KEY)
# vLLM 0.26's own extra_args keys that share the ``kv_`` prefix: never ours to refuse
VLLM_KV_KEYS = frozenset({"kv_transfer_params", "kv_cache_report_mode"})


@dataclass(frozen=True)
class RequestSettings:
    """One request's departures from the engine's eviction settings.

    Attributes:
        enabled: ``False`` when the request asked for ``kv_eviction: "none"``.
        budget: the request's own budget; ``None`` means the engine's.
        compress_prefix: ``N``, the compression boundary; ``None`` means the whole prompt.
    """

    enabled: bool = True
    budget: KVBudget | None = None
    compress_prefix: int | None = None

    @classmethod
    def parse(cls, extra_args: Mapping[str, Any] | None, policy: str) -> "RequestSettings":
        """The settings in ``extra_args`` for an engine evicting with ``policy``.

        Raises:
            VLLMValidationError: an unknown ``kv_*`` key or a bad value, naming the fix.
        """
        extra_args = extra_args or {}
        unknown = sorted(key for key in extra_args if key.startswith("kv_") and key not in SETTING_KEYS + tuple(VLLM_KV_KEYS))
        if unknown:
            raise VLLMValidationError(
                f"unknown per-request eviction setting {', '.join(map(repr, unknown))}; "
                f"the settings are {', '.join(SETTING_KEYS)}",
                parameter=f"vllm_xargs.{unknown[0]}",
            )
        return cls(
            enabled=_parse_enabled(extra_args.get(EVICTION_KEY), policy),
            budget=_parse_budget(extra_args.get(BUDGET_KEY)),
            compress_prefix=_parse_compress_prefix(extra_args.get(COMPRESS_PREFIX_KEY)),
        )

    def check_prompt(self, prompt_len: int) -> None:
        """Raises ``VLLMValidationError`` when the boundary lies beyond the prompt."""
        if self.compress_prefix is not None and self.compress_prefix > prompt_len:
            raise VLLMValidationError(
                f"{COMPRESS_PREFIX_KEY}={self.compress_prefix} lies beyond the prompt's {prompt_len} tokens; "
                f"it counts the leading prompt tokens to compress (the context before the question)",
                parameter=f"vllm_xargs.{COMPRESS_PREFIX_KEY}",
                value=self.compress_prefix,
            )


def check_request(extra_args: Mapping[str, Any] | None, policy: str, prompt_len: int | None) -> RequestSettings:
    """Front-end check of one request: its settings, and the boundary against its prompt
    (``prompt_len`` ``None`` when the prompt is not token ids: checked later)."""
    settings = RequestSettings.parse(extra_args, policy)
    if prompt_len is not None:
        settings.check_prompt(prompt_len)
    return settings


def _parse_enabled(value: Any, policy: str) -> bool:
    if value is None or value == policy:
        return True
    if value == NO_EVICTION:
        return False
    raise VLLMValidationError(
        f"{EVICTION_KEY} must be {NO_EVICTION!r} (no eviction for this request) or {policy!r} (this server's "
        f"policy, the default), got {value!r}; the policy itself is chosen when the server starts (--kv-eviction)",
        parameter=f"vllm_xargs.{EVICTION_KEY}",
        value=value,
    )


def _parse_budget(value: Any) -> KVBudget | None:
    if value is None:
        return None
    try:
        return KVBudget.parse(value)
    except (TypeError, ValueError) as error:
        raise VLLMValidationError(
            f"{BUDGET_KEY}: {error}; give tokens kept per head (e.g. 256) or the fraction removed (e.g. 0.75)",
            parameter=f"vllm_xargs.{BUDGET_KEY}",
            value=value,
        ) from None


def _parse_compress_prefix(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VLLMValidationError(
            f"{COMPRESS_PREFIX_KEY} must be a positive whole number of leading prompt tokens, got {value!r}",
            parameter=f"vllm_xargs.{COMPRESS_PREFIX_KEY}",
            value=value,
        )
    return value
