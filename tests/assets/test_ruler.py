"""RULER sample generation (offline, RULER's own generators) and scoring."""

import runpy
import subprocess
import sys

import pytest

from judgeq_vllm.assets import asset_path, ruler

SEQ_LEN = 2048


@pytest.fixture(scope="session")
def niah_samples(ruler_fetched, smollm2_dir):
    return ruler.generate_samples("niah_single_1", SEQ_LEN, smollm2_dir, num_samples=2)


@pytest.fixture(scope="session")
def qa_samples(ruler_fetched, smollm2_dir):
    return ruler.generate_samples("qa_1", SEQ_LEN, smollm2_dir, num_samples=2)


def test_tasks_and_metrics_are_rulers_own(ruler_fetched):
    tasks_yaml, generator_constants = ruler._ruler_definitions(str(asset_path("ruler")))
    assert set(ruler.TASKS) == set(tasks_yaml) and len(ruler.TASKS) == 13
    eval_constants = runpy.run_path(
        str(asset_path("ruler") / "long_context_eval/eval/synthetic/constants.py")
    )["TASKS"]
    for task in ruler.TASKS:
        generator = tasks_yaml[task]["task"]
        assert ruler.METRICS[task] == eval_constants[generator]["metric_fn"].__name__
        assert generator in generator_constants


@pytest.mark.parametrize("samples_fixture", ["niah_samples", "qa_samples"])
def test_samples_fit_the_length_and_split_into_context_and_question(samples_fixture, request):
    samples = request.getfixturevalue(samples_fixture)
    assert len(samples) == 2
    for sample in samples:
        assert SEQ_LEN // 2 < sample["length"] <= SEQ_LEN
        assert sample["context"] + sample["question"] + sample["answer_prefix"] == sample["input"]
        assert sample["outputs"] and sample["max_new_tokens"] > 0
        assert sample["metric"] == ruler.METRICS[sample["task"]]


def test_niah_needle_is_in_the_context_and_the_key_in_the_question(niah_samples):
    for sample in niah_samples:
        assert sample["task"] == "niah_single_1"
        (value,) = sample["outputs"]
        assert value in sample["context"] and value not in sample["question"]
        assert sample["question"].startswith("\nWhat is the special magic number for ")
        key = sample["question"].split(" for ")[1].split(" mentioned")[0]
        # niah.py words the needle in the plural even for one value.
        assert f"special magic numbers for {key} is: {value}." in sample["context"]
        assert sample["answer_prefix"].startswith(" The special magic number for")


def test_qa_answer_is_in_the_documents(qa_samples):
    for sample in qa_samples:
        assert sample["question"].strip().splitlines()[-1].startswith("Question: ")
        assert sample["answer_prefix"] == " Answer:"
        assert any(answer in sample["context"] for answer in sample["outputs"])


def test_generation_is_reproducible_for_a_seed(niah_samples, smollm2_dir):
    again = ruler.generate_samples("niah_single_1", SEQ_LEN, smollm2_dir, num_samples=1)
    assert again[0]["input"] == niah_samples[0]["input"]


def test_runner_patches_sent_tokenize_and_blocks_the_network(ruler_fetched, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import socket\n"
        "from nltk.tokenize import sent_tokenize\n"
        "print(sent_tokenize('Dr. Smith went home. He was tired.'))\n"
        "try:\n"
        "    socket.create_connection(('pypi.org', 443), timeout=5)\n"
        "    print('CONNECTED')\n"
        "except ConnectionRefusedError as error:\n"
        "    print('REFUSED', error)\n"
    )
    completed = subprocess.run(
        [sys.executable, str(ruler._RUNNER), str(asset_path("ruler")), str(asset_path("punkt")),
         str(script)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert "['Dr. Smith went home.', 'He was tired.']" in completed.stdout
    assert "REFUSED" in completed.stdout and "CONNECTED" not in completed.stdout


def test_unknown_task_and_hub_names_are_refused():
    with pytest.raises(ValueError, match="niah_single_1"):
        ruler.generate_samples("niah", SEQ_LEN, ".", 1)
    with pytest.raises(ValueError, match="local tokenizer folder"):
        ruler.generate_samples("vt", SEQ_LEN, "meta-llama/Llama-3.1-8B-Instruct", 1)


@pytest.mark.parametrize(
    "task, prediction, references, expected",
    [
        ("niah_multivalue", "1111 and 2222", ["1111", "2222", "3333", "4444"], 50.0),
        ("niah_single_1", "  The number is 1234567.\x00", ["1234567"], 100.0),
        ("qa_1", "It is in FRANCE", ["Paris", "France"], 100.0),
        ("qa_2", "no idea", ["Paris", "France"], 0.0),
    ],
)
def test_scores_follow_rulers_string_match(task, prediction, references, expected):
    assert ruler.score_sample(task, prediction, references) == expected


def test_task_score_is_the_mean_over_samples():
    assert ruler.score_predictions("vt", ["A B", "A"], [["A", "B"], ["A", "B"]]) == 75.0
    assert ruler.score_predictions("vt", [None], [["A"]]) == 0.0
