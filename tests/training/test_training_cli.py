"""``judgeq-vllm train`` / ``hit-rate`` end to end, and their user errors (exit code 2)."""

import json

import pytest

from judgeq_vllm.cli import main
from judgeq_vllm.soft_tokens import SoftTokens, checkpoint_fingerprint
from judgeq_vllm.training.data import write_prompt_file


@pytest.fixture(scope="module")
def data_file(tiny_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    write_prompt_file(tiny_corpus, path)
    return path


def _common(cache_dir):
    return ["--cache-dir", str(cache_dir), "--no-progress", "--max-prompt-tokens", "192", "--max-new-tokens", "8"]


def test_train_then_hit_rate(tmp_path, data_file, smollm2_dir, response_cache_dir, capsys):
    artifact = tmp_path / "soft.safetensors"
    argv = ["train", "--model", smollm2_dir, "--data", str(data_file), "--out", str(artifact), "--steps", "2",
            "--batch-size", "1", "--warmup-steps", "0", "--lr", "1e-2", *_common(response_cache_dir)]
    assert main(argv) == 0
    assert "2/2 steps on 3 prompts" in capsys.readouterr().out
    soft = SoftTokens.load(artifact)
    soft.check_model("SmolLM2-135M-Instruct", checkpoint_fingerprint(smollm2_dir))
    assert soft.base_model == "SmolLM2-135M-Instruct" and soft.training["data"].startswith(str(data_file))

    results, plot = tmp_path / "hit.json", tmp_path / "hit.png"
    argv = ["hit-rate", "--model", smollm2_dir, "--soft-tokens", str(artifact), "--data", str(data_file),
            "--budgets", "32", "64", "--out", str(results), "--plot", str(plot), *_common(response_cache_dir)]
    assert main(argv) == 0
    report = json.loads(results.read_text())
    assert report["n_prompts"] == 2  # the held-out records only
    assert set(report["budgets"]) == {"32", "64"}
    assert set(report["budgets"]["64"]) == {"n_prompts", "judgeq", "snapkv", "judgeq_untrained"}
    assert plot.stat().st_size > 0


def _config_dir(tmp_path, config):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"model_type": "mistral", "sliding_window": 4096}, "sliding-window attention"),
        ({"model_type": "gemma3_text"}, "not all full attention"),
        ({"model_type": "t5"}, "encoder-decoder"),
        ({"model_type": "deepseek_v3"}, "MLA attention"),
    ],
)
def test_models_without_full_attention_are_refused(tmp_path, data_file, config, reason, capsys):
    model = _config_dir(tmp_path, config)
    assert main(["train", "--model", model, "--data", str(data_file), "--out", str(tmp_path / "a.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: Judge Q soft tokens need a decoder-only model") and reason in error


@pytest.mark.parametrize(
    "content, extra, message",
    [
        (None, [], "does not exist"),
        ("not json at all\n", [], "neither a JSON document nor JSON lines"),
        ('{"foo": "bar"}\n', [], "holds no usable prompt"),
        ('{"text": "only held out", "split": "heldout"}\n', [], "no 'train' record"),
        ('{"text": "a prompt"}\n', ["--max-prompts", "0"], "no train prompt to use"),
        ('{"text": "a prompt"}\n', ["--steps", "0"], "invalid training settings: steps=0"),
    ],
)
def test_bad_data_exits_2_with_the_reason(tmp_path, content, extra, message, capsys):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "a.safetensors"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_a_model_config_is_refused(tmp_path, data_file, capsys):
    assert main(["train", "--model", str(tmp_path), "--data", str(data_file), "--out", str(tmp_path / "a.safetensors")]) == 2
    assert "cannot read a model config from" in capsys.readouterr().err


def test_hit_rate_refuses_a_missing_artifact(tmp_path, capsys):
    assert main(["hit-rate", "--soft-tokens", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "r.json")]) == 2
    assert "does not exist; train one with `judgeq-vllm train`" in capsys.readouterr().err
