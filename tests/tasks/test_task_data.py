"""Task registry and data loading: counts, ids, shuffling, data-dir resolution and clear errors."""

import importlib.util
import json
import shutil

import pytest

from rlkv import tasks
from rlkv.tasks.base import Example, Task

EXPECTED = {
    "gsm8k": 1319,
    "math500": 500,
    "aime24": 30,
    "mbpp": 500,
    "math_train": 7474 - 4 + 975,  # 4 lack answers
    "gsm8k_train": 7473,
}


def test_registry_lists_and_gets_tasks():
    assert tasks.names() == ["gsm8k", "math500", "aime24", "mbpp", "math_train", "gsm8k_train", "arith"]
    assert all(tasks.get(name).name == name for name in tasks.names())


def test_unknown_task_name_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k': expected one of gsm8k, math500, aime24, mbpp"):
        tasks.get("gsm9k")


def test_register_adds_a_task_once(monkeypatch):
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))

    class Echo(Task):
        name = "echo"

    echo = tasks.register(Echo())
    assert tasks.get("echo") is echo and "echo" in tasks.names()
    with pytest.raises(ValueError, match="already registered"):
        tasks.register(Echo())


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_file_task_loads(name, data_dir):
    examples = tasks.get(name).load(data_dir)
    assert len(examples) == EXPECTED[name]
    assert len({e.id for e in examples}) == len(examples), "ids must be unique"
    assert all(isinstance(e, Example) and e.question and e.answer for e in examples)


def test_gsm8k_answer_is_the_number_after_hashes_without_commas(data_dir):
    examples = tasks.get("gsm8k").load(data_dir)
    assert examples[0].answer == "18"
    assert all(
        "," not in e.answer and e.meta["solution"].split("####")[-1].strip().replace(",", "") == e.answer
        for e in examples
    )
    assert any(e.answer == "1450000" for e in examples)


def test_limit_and_seed(data_dir):
    task = tasks.get("math500")
    in_order = task.load(data_dir, limit=5)
    assert [e.id for e in in_order] == [e.id for e in task.load(data_dir)[:5]]
    shuffled = task.load(data_dir, limit=5, seed=1)
    assert shuffled == task.load(data_dir, limit=5, seed=1)
    assert shuffled != task.load(data_dir, limit=5, seed=2) and shuffled != in_order
    assert task.load(data_dir, limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        task.load(data_dir, limit=-1)


def test_math_train_reads_both_files(data_dir):
    examples = tasks.get("math_train").load(data_dir)
    sources = {e.id.rsplit("-", 1)[0] for e in examples}
    assert sources == {"math_train", "aime_1983_2023_train"}
    assert examples[-1].meta["year"] and examples[0].meta["type"]


def test_data_dir_defaults_to_env_then_shared_data(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("RLKV_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    assert len(tasks.get("aime24").load()) == 30
    monkeypatch.delenv("RLKV_DATA_DIR")
    (tmp_path / "repo").mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    shutil.copy(data_dir / "aime24_test.jsonl", tmp_path / "shared" / "data")
    monkeypatch.chdir(tmp_path / "repo")
    assert len(tasks.get("aime24").load()) == 30
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="pass data_dir"):
        tasks.get("aime24").load()


def test_missing_file_names_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"'gsm8k_test.jsonl', not found in {tmp_path}"):
        tasks.get("gsm8k").load(tmp_path)


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path):
    good = json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"})
    (tmp_path / "gsm8k_test.jsonl").write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    with pytest.raises(ValueError, match=r"gsm8k_test.jsonl: line 3 is not valid JSON"):
        tasks.get("gsm8k").load(tmp_path)


def test_missing_field_is_reported_with_field_and_line(tmp_path):
    (tmp_path / "math500_test.jsonl").write_text(
        json.dumps({"problem": "p", "solution": "s", "answer": "1", "unique_id": "a"})
        + "\n"
        + json.dumps({"problem": "p", "solution": "s", "unique_id": "b"})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"math500_test.jsonl: line 2 is missing field 'answer'"):
        tasks.get("math500").load(tmp_path)


def test_malformed_json_list_file_is_reported_with_its_line(tmp_path):
    (tmp_path / "math_train.json").write_text('[\n  {"problem": "p", "answer": "1"},\n  {"problem": \n]')
    (tmp_path / "aime_1983_2023_train.json").write_text("[]")
    with pytest.raises(ValueError, match=r"math_train.json: not valid JSON at line 4"):
        tasks.get("math_train").load(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="'datasets' is installed")
def test_hub_dataset_without_datasets_package_says_what_to_install():
    with pytest.raises(ImportError, match="pip install datasets"):
        tasks.get("gsm8k").load("hf:openai/gsm8k:main")


def test_invalid_record_content_is_reported_with_its_line(tmp_path):
    (tmp_path / "gsm8k_test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "it is 2"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm8k_test.jsonl: line 1 is not a valid gsm8k record: .*'#### <answer>'"):
        tasks.get("gsm8k").load(tmp_path)


def test_a_task_mix_loads_prompts_and_grades_each_example_by_its_own_task():
    from rlkv import tasks

    mix = tasks.get("gsm8k_train+math_train")
    examples = mix.load()
    assert mix.name == "gsm8k_train+math_train" and mix.split == "train"
    assert len(examples) == len(tasks.get("gsm8k_train").load()) + len(tasks.get("math_train").load())
    gsm, math = examples[0], examples[-1]
    assert (gsm.meta["task"], math.meta["task"]) == ("gsm8k_train", "math_train")
    assert mix.grade_many([gsm, math], [f"\\boxed{{{gsm.answer}}}", "\\boxed{nope}"]) == [1.0, 0.0]
    assert mix.user_message(gsm) == tasks.get("gsm8k_train").user_message(gsm)
    shuffled = mix.load(seed=3, limit=50)
    assert len(shuffled) == 50 and {e.meta["task"] for e in shuffled} == {"gsm8k_train", "math_train"}
    strict = mix.with_answer_rule("authors")
    assert (mix.answer_rule, strict.answer_rule) == ("rlkv", "authors")  # in the curriculum cache's key
    assert strict.grade(gsm, f"so {gsm.answer}") == 0.0 and mix.grade(gsm, f"so {gsm.answer}") == 1.0
    with pytest.raises(ValueError, match="at least two distinct tasks"):
        tasks.get("gsm8k+gsm8k")
    with pytest.raises(ValueError, match="are not"):
        tasks.get("gsm8k+mbpp").with_answer_rule("authors")
