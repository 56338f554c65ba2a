"""DuoAttention-style identification: passkey documents and the distillation loop."""

import json
import random

import pytest
from conftest import tiny_model, tiny_tokenizer

import rlkv
from rlkv.identify import DuoConfig, identify_duo, passkey_document

TEXT = "the quick brown fox jumps over the lazy dog and keeps running through the field "


def test_passkey_documents_hold_every_key_and_end_with_the_answer():
    tok = tiny_tokenizer()
    ids, n_answer = passkey_document(tok, TEXT, length=200, num_keys=3, rng=random.Random(0))
    decode = lambda part: "".join(tok.convert_ids_to_tokens(part))  # noqa: E731  (char-level tokenizer)
    text, answer = decode(ids), decode(ids[-n_answer:])
    keys = answer.split("are")[-1].strip(" .").split(", ")
    assert len(keys) == 3 and all(f"is {k}." in text for k in keys)
    again, _ = passkey_document(tok, TEXT, length=200, num_keys=3, rng=random.Random(0))
    other, _ = passkey_document(tok, TEXT, length=200, num_keys=3, rng=random.Random(1))
    assert again == ids and other != ids


def test_distillation_trains_the_gates_and_writes_duo_heads(tmp_path):
    model = tiny_model("qwen2", layers=2)
    config = DuoConfig(sink=2, recent=8, steps=4, lr=0.2, l1=1.0, length=40, num_keys=2, batch=2)
    heads = identify_duo(model, tiny_tokenizer(), TEXT, config, tmp_path)
    assert heads.method == "duo" and heads.shape == (2, 2)
    assert float(heads.scores.max()) < 1.0 and float(heads.scores.min()) >= 0.0  # moved, and clamped
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(r["mse"] >= 0 for r in log)
    assert rlkv.HeadScores.load(tmp_path / "heads.json").method == "duo"
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again


def test_at_init_the_student_is_the_teacher_and_l1_starts_the_descent(tmp_path):
    """alpha = 1 is the full model: MSE 0 and no MSE gradient; the L1 term moves the gates, then MSE appears."""
    model = tiny_model("llama", layers=2)
    config = DuoConfig(sink=1, recent=4, steps=3, lr=0.1, l1=1.0, length=60, num_keys=2)
    identify_duo(model, tiny_tokenizer(), TEXT, config, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["mse"] == 0.0 and log[0]["alpha_mean"] < 1.0
    assert log[-1]["mse"] > 0.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="DuoConfig.steps"):
        DuoConfig(steps=0)
    with pytest.raises(ValueError, match="haystack text is empty"):
        passkey_document(tiny_tokenizer(), "", 10, 1, random.Random(0))


def test_cli_identify_duo(tmp_path):
    from typer.testing import CliRunner

    from rlkv.cli import app

    tiny_model("mistral", layers=1).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "hay.txt").write_text(TEXT)
    args = [
        "identify-duo",
        "--model",
        str(tmp_path / "m"),
        "--out",
        str(tmp_path / "duo"),
        "--steps",
        "2",
        "--length",
        "30",
        "--num-keys",
        "1",
        "--sink",
        "1",
        "--recent",
        "4",
        "--l1",
        "1",
    ]
    result = CliRunner().invoke(app, args + ["--text", str(tmp_path / "hay.txt")])
    assert result.exit_code == 0, result.output
    assert rlkv.HeadScores.load(tmp_path / "duo" / "heads.json").method == "duo"
    missing = CliRunner().invoke(app, args + ["--text", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "text file not found" in missing.output
