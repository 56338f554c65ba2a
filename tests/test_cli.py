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
        (["serve", "--model", "{model}", "--sparsity", "0.5"], "sparsity 0.5 needs --heads"),
        (["serve", "--model", "{model}", "--method", "nope"], "unknown method 'nope'"),
        (["heads", "show", "rlkv:qwen-2.5-7b-r1"], "not shipped with rlkv"),
        (["heads", "show", "{heads}", "--sparsity", "0.5", "--rule", "median"], "unknown keep rule 'median'"),
        (
            ["identify", "--model", "{model}", "--out", "/tmp/x", "--recipe", "v9"],
            "recipe must be one of paper, rlkv-v0",
        ),
        (
            ["identify", "--model", "{model}", "--out", "/tmp/x", "--advantages", "token"],
            "advantages has an invalid value",
        ),
        (
            ["identify", "--model", "{model}", "--out", "/tmp/x", "--band=-1,1"],
            "--band has an invalid value: (-1.0, 1.0) (expected low, high with 0 <= low < high <= 1)",
        ),
        (
            ["eval", "--model", "{model}", "--task", "arith", "--out", "/tmp/x", "--method", "full,h2o"],
            "--method h2o needs --budget N (tokens kept per layer and KV head) or --match-bytes",
        ),
        (
            ["eval", "--model", "{model}", "--task", "arith", "--out", "/tmp/x", "--keep-rule", "median"],
            "--keep-rule must be one of",
        ),
        (
            ["serve", "--model", "{model}", "--method", "snapkv"],
            "--method snapkv needs --budget N (tokens kept",
        ),
        (
            ["serve", "--model", "{model}", "--kv-budget", "nan"],
            "--kv-budget expects a share of free GPU memory",
        ),
        (
            ["serve", "--model", "{model}", "--kv-dtype", "int4"],
            "kv_dtype must be one of bf16, fp8, fp8-kept, got 'int4'",
        ),
        (
            ["eval", "--model", "{model}", "--task", "arith", "--out", "/tmp/x", "--kv-dtype", "fp16"],
            "--kv-dtype must be one of bf16, fp8, fp8-kept, got 'fp16'",
        ),
        (
            ["eval", "--model", "{model}", "--task", "arith", "--out", "/tmp/x"]
            + ["--method", "rlkv,h2o", "--budget", "8", "--kv-dtype", "fp8-kept"],
            "--kv-dtype fp8-kept keeps a head split's kept heads in FP8; h2o keeps no head whole",
        ),
        (["serve", "--model", "{model}", "--data-parallel", "0"], "--data-parallel must be at least 1"),
        (["serve", "--model", "{model}", "--data-parallel", "-2"], "--data-parallel must be at least 1"),
        (
            ["serve", "--model", "{model}", "--data-parallel", "2", "--engine-thread"],
            "--data-parallel runs engine processes: it cannot be combined with --engine-thread",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code_2(heads_file, tmp_path, args, message):
    """Flag mistakes next to a model path that passes its check ({model}: never loaded, the flags fail first)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    given = {"{heads}": str(heads_file), "{model}": str(tmp_path / "model")}
    result = runner.invoke(app, [given.get(a, a) for a in args])
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


def test_demo_grades_every_method_and_h2o_holds_the_first_heads_bytes(tmp_path):
    from conftest import saved_tiny_model

    saved_tiny_model(tmp_path / "model")  # qwen2, 3 layers x 2 KV heads
    rlkv_heads = HeadScores(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]), method="rlkv").save(tmp_path / "r.json")
    duo_heads = HeadScores(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), method="duo").save(tmp_path / "d.json")
    args = ["demo", "--model", str(tmp_path / "model"), "--heads", f"rlkv={rlkv_heads}", "--heads", f"duo={duo_heads}"]
    result = runner.invoke(app, args + ["--questions", "2", "--max-new-tokens", "6", "--sink", "1", "--recent", "2"])
    assert result.exit_code == 0, result.output
    rows = {
        m.group(1): (m.group(2), float(m.group(3)), float(m.group(4)))
        for m in re.finditer(
            r"│ (full cache|rlkv heads|duo heads|random heads|h2o, \d+ tokens) +│ +(\d/2) │ +([\d.]+) MiB │ "
            r"+([\d.]+) │",
            result.stdout,
        )
    }
    assert list(rows) == ["full cache", "rlkv heads", "duo heads", "random heads"] + [k for k in rows if "h2o" in k]
    assert len(rows) == 5 and rows["full cache"][2] == 1.0 and rows["rlkv heads"][2] < 1.0
    h2o = next(v for k, v in rows.items() if "h2o" in k)
    assert h2o[2] < 1.0  # a token budget below the sequences' lengths: at the rlkv heads' bytes, not a full cache's
    assert "Brandon" in result.stdout.split("sparsity 0.5")[0]  # the first problem, in the answers table
    progress = result.stderr.splitlines()
    assert len(progress) == 5 and progress[0].startswith("full cache: ") and "/2 correct" in progress[0]


def test_demo_without_weights_says_how_to_get_them(monkeypatch, tmp_path):
    import rlkv.cli.demo

    monkeypatch.setattr(rlkv.cli.demo, "MODEL_FILE", tmp_path / "absent.gguf")
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 2 and "get-model qwen2.5-coder-0.5b-instruct" in result.stderr
    assert "Qwen/Qwen2.5-Coder-0.5B-Instruct" in result.stderr


def test_demo_problems_are_gsm8k_test_problems_with_their_answers():
    import json

    from conftest import DATA_DIR

    from rlkv.demo import PROBLEMS, problems
    from rlkv.tasks import GSM8K

    shipped = problems()
    assert len(shipped) == 16 and len(problems(8)) == 8
    if not (DATA_DIR / "gsm8k_test.jsonl").is_file():
        pytest.skip(f"GSM8K data absent (expected {DATA_DIR})")
    test = GSM8K().load(DATA_DIR)
    indices = [int(p.id.split("-")[1]) for p in shipped]
    assert indices == sorted(indices)
    for problem, index in zip(shipped, indices):
        assert (problem.question, problem.answer) == (test[index].question, test[index].answer)
    assert "full cache's answers alone" in json.loads(PROBLEMS.read_text())["selection"]


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
    """The model's config is empty (it would not load): each of these must be refused before anything tries."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty_config").mkdir()
    (tmp_path / "empty_config" / "config.json").write_text("")
    model = str(tmp_path / "empty_config")
    args = ["eval", "--model", model, "--task", "arith", "--method", "full", "--out", str(tmp_path / "run")]
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


def test_heads_list_names_rlkvs_own_heads_and_the_published_patterns():
    result = runner.invoke(app, ["heads", "list"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 4}
    assert list(rows)[:3] == [
        "rlkv:qwen2.5-coder-0.5b-instruct",
        "duo:qwen2.5-coder-0.5b-instruct",
        "duo:smollm2-135m-instruct",
    ]
    assert re.search(r"24 x 2 +│ rlkv +│ rlkv-v0 +│ rlkv \(results/identify_qwen05_tau02/\)", rows[list(rows)[0]])
    assert re.search(r"32 x 8 +│ duo +│ published", rows["duo:meta-llama-3.1-8b-instruct"])
    assert "not shipped (no licence)" in result.output
    result = runner.invoke(app, ["heads", "show", "rlkv:qwen2.5-coder-0.5b-instruct", "--sparsity", "0.5"])
    assert result.exit_code == 0 and "24/48 heads" in result.output
    assert "recipe: rlkv-v0" in result.output and "--tau 0.2" in result.output  # how they were made
    result = runner.invoke(app, ["heads", "show", "duo:meta-llama-3.1-8b-instruct", "--sparsity", "0.5"])
    assert result.exit_code == 0 and "128/256 heads" in result.output


def test_a_shipped_name_works_wherever_heads_are_taken(tmp_path):
    """rlkv:qwen2.5-coder-0.5b-instruct (24 x 2) on a tiny model of that layout: generate, eval, compress, methods."""
    from conftest import DATA_DIR, tiny_model, tiny_tokenizer

    import rlkv

    model = tiny_model("qwen2", layers=24)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    name = "rlkv:qwen2.5-coder-0.5b-instruct"
    common = ["--model", str(tmp_path / "model"), "--max-new-tokens", "2", "--sink", "1", "--recent", "2"]
    result = runner.invoke(app, ["generate", *common, "--heads", name, "--sparsity", "0.5", "--prompt", "hi"])
    assert result.exit_code == 0, result.output
    if (DATA_DIR / "gsm8k_test.jsonl").is_file():
        args = ["eval", *common, "--task", "gsm8k", "--limit", "1", "--method", "rlkv", "--sparsity", "0.5"]
        result = runner.invoke(
            app, args + ["--heads", f"rlkv={name}", "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "run")]
        )
        assert result.exit_code == 0, result.output
    with rlkv.compress(model, name, sparsity=0.5) as c:
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert c.cache.nbytes() > 0
    method = rlkv.methods.build("rlkv", rlkv.Layout.of(model), 0.5, heads=name)
    assert int(method.keep.sum()) == 24 and method.params["heads_file"].endswith("0.5b-instruct.rlkv.json")
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(tmp_path / "model"),
            "--heads",
            "duo:smollm2-135m-instruct",
            "--sparsity",
            "0.5",
            "--prompt",
            "hi",
        ],
    )
    assert result.exit_code == 2 and "made for SmolLM2-135M-Instruct" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/nowhere/model.gguf", "--prompt", "hi"], "GGUF file not found: /nowhere/model.gguf"),
        (
            ["generate", "--model", "MODEL", "--heads", "GARBAGE", "--sparsity", "0.5", "--prompt", "hi"],
            "not a torch file of gates",
        ),
        (
            ["generate", "--model", "MODEL", "--heads", "rlkv:nothing", "--prompt", "hi"],
            "the RLKV authors' gates are not shipped",
        ),
        (["serve", "--model", "/nowhere"], "model path not found: /nowhere"),
        (["serve", "--model", "MODEL", "--heads", "missing.json", "--sparsity", "0.5"], "head scores file not found"),
        (
            ["eval", "--model", "MODEL", "--task", "gsm8k", "--heads", "rlkv=GARBAGE", "--out", "OUT"],
            "not a torch file",
        ),
        (["identify", "--model", "/nowhere", "--out", "OUT"], "model path not found"),
        (
            ["identify-duo", "--model", "MODEL.gguf", "--text", "t.txt", "--out", "OUT"],
            "does not start with the GGUF magic",
        ),
        (["demo", "--heads", "duo=missing.json"], "head scores file not found"),
        (["heads", "show", "GARBAGE"], "not a torch file of gates"),
    ],
)
def test_path_errors_are_reported_before_torch_is_imported(tmp_path, args, message):
    """A wrong path costs well under a second: it is refused before torch, transformers or a model load."""
    import subprocess
    import sys
    from pathlib import Path

    import rlkv

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "garbage.bin").write_bytes(b"not a torch file at all")
    (tmp_path / "MODEL.gguf").write_bytes(b"nope")
    names = {"MODEL": tmp_path / "model", "GARBAGE": tmp_path / "garbage.bin", "OUT": tmp_path / "out"}
    args = [str(names.get(a, a)).replace("rlkv=GARBAGE", f"rlkv={tmp_path / 'garbage.bin'}") for a in args]
    args = [str(tmp_path / a) if a.endswith(".gguf") else a for a in args]
    code = (
        "import sys; from typer.testing import CliRunner; from rlkv.cli import app\n"
        "result = CliRunner().invoke(app, sys.argv[1:])\n"
        "print(result.exit_code, sorted({'torch', 'transformers'} & set(sys.modules)))\n"
        "print(result.stderr.strip())"
    )
    src = str(Path(rlkv.__file__).parents[1])
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env={"PYTHONPATH": src}, cwd=tmp_path
    )
    status, error = done.stdout.split("\n", 1)
    assert status == "2 []" and message in " ".join(error.split()), done.stdout + done.stderr


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
