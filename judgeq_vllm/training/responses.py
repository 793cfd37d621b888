"""The model's own greedy responses to the prompts, generated in batches and cached on disk.

The response tokens' attention is the training target (and the reference of the hit-rate
evaluation), so each prompt needs the response the model itself gives. Generating them
is the slowest part of a run; they are stored in one JSON-lines file per (model
fingerprint, generation settings) under the cache folder, keyed by the prompt's token
hash, and appended batch by batch, so a rerun or a resumed run never regenerates them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..soft_tokens import hf_model_fingerprint
from .data import prompt_hash
from .progress import progress


@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides the model and the prompt that decides a greedy response.

    ``dtype`` is part of it because bf16 and fp32 weights can choose different tokens.
    """

    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    dtype: str

    def key(self) -> str:
        return hashlib.sha256(json.dumps({"decoding": "greedy", **asdict(self)}, sort_keys=True).encode()).hexdigest()


class ResponseCache:
    """Responses by prompt hash, for one model and one :class:`GenerationSettings`."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str, settings: GenerationSettings):
        self.path = Path(folder) / f"responses-{fingerprint[:16]}-{settings.key()[:16]}.jsonl"
        self.responses: dict[str, list[int]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a run killed mid-write
                self.responses[entry["prompt"]] = entry["response"]

    def get(self, prompt_ids: Sequence[int]) -> list[int] | None:
        return self.responses.get(prompt_hash(prompt_ids))

    def add(self, items: Sequence[tuple[Sequence[int], list[int]]]) -> None:
        """Stores ``(prompt ids, response ids)`` pairs, appending them to the file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for prompt_ids, response in items:
            key = prompt_hash(prompt_ids)
            self.responses[key] = response
            lines.append(json.dumps({"prompt": key, "response": response}))
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))


def stop_token_ids(model: torch.nn.Module, tokenizer) -> tuple[int, ...]:
    """The ids that end a response: the generation config's EOS ids, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return tuple(sorted(set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])))


def model_responses(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    cache_dir: str | os.PathLike,
    batch_size: int = 16,
    show_progress: bool = True,
) -> list[list[int]]:
    """The greedy response to every prompt, stop token excluded (possibly empty).

    Missing ones are generated in batches of similar-length prompts (left padding) and
    cached; cached ones are read back.
    """
    settings = GenerationSettings(max_new_tokens, stop_token_ids(model, tokenizer), str(model.dtype).removeprefix("torch."))
    cache = ResponseCache(cache_dir, hf_model_fingerprint(model), settings)
    missing = sorted({prompt_hash(ids): ids for ids in prompts if cache.get(ids) is None}.values(), key=len)
    if missing:
        bar = progress(len(missing), "generating responses", enabled=show_progress)
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            cache.add(list(zip(batch, _generate(model, tokenizer, batch, settings))))
            bar.update(len(batch))
        bar.close()
    return [cache.get(ids) for ids in prompts]


@torch.no_grad()
def _generate(model, tokenizer, prompts: Sequence[Sequence[int]], settings: GenerationSettings) -> list[list[int]]:
    from transformers import GenerationConfig

    pad = next((token for token in (tokenizer.pad_token_id, *settings.stop_token_ids) if token is not None), 0)
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids))
        attention_mask[row, width - len(ids) :] = 1
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        eos_token_id=list(settings.stop_token_ids),
        pad_token_id=pad,
    )
    output = model.generate(
        input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device), generation_config=config
    )
    responses = []
    for row in output[:, width:].tolist():
        stops = [index for index, token in enumerate(row) if token in settings.stop_token_ids]
        responses.append(row[: stops[0]] if stops else row)
    return responses
