"""The evaluation harness and report on a tiny random model (mechanics, not accuracy)."""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, tiny_model, tiny_tokenizer

import rlkv
from rlkv.eval import EvalConfig, Shard, evaluate, report
from rlkv.eval.rundir import read_jsonl, run_records
from rlkv.generation import RepetitionStop
from rlkv.models import generated_end

STABLE = (
    "task",
    "method",
    "sparsity",
    "n",
    "accuracy",
    "mean_tokens",
    "pct_length",
    "pct_repetition",
    "kv_mean_ratio",
    "kv_peak_ratio",
)


@pytest.fixture(scope="module")
def lm():
    model = tiny_model("llama", layers=2)
    tok = tiny_tokenizer()
    model.generation_config.eos_token_id = 2
    return model, tok


def config(**kw):
    base = dict(
        tasks=["arith", "gsm8k"],
        methods=["full", "streaming", "random"],
        sparsities=[0.5],
        limit=5,
        max_new_tokens=12,
        batch_size=3,
        sink=2,
        recent=4,
        data_dir=str(DATA_DIR),
    )
    return EvalConfig(**{**base, **kw})


def test_run_records_every_sample_and_aggregates(lm, tmp_path):
    res = evaluate(*lm, config(), tmp_path / "run", progress=False)
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert len(samples) == 2 * 3 * 5
    s = samples[0]
    assert {"id", "completion", "tokens", "finish", "score", "kv_bytes", "prompt_tokens"} <= set(s)
    assert s["finish"] in ("eos", "length", "repetition") and 0 <= s["score"] <= 1
    rows = {(r["task"], r["method"], r["sparsity"]): r for r in res.rows}
    assert set(rows) == {
        (t, m, sp) for t in ("arith", "gsm8k") for m, sp in (("full", 0.0), ("streaming", 1.0), ("random", 0.5))
    }
    for t in ("arith", "gsm8k"):
        assert rows[(t, "full", 0.0)]["kv_peak_ratio"] == pytest.approx(1.0)
        assert rows[(t, "streaming", 1.0)]["kv_peak_ratio"] < rows[(t, "random", 0.5)]["kv_peak_ratio"] < 1.0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["invocations"][0]["environment"]["torch"] == torch.__version__ and cfg["layout"]["num_layers"] == 2
    assert cfg["invocations"][0]["tasks"] == ["arith", "gsm8k"] and "command" in cfg["invocations"][0]
    assert "| method | sparsity | arith | gsm8k |" in res.table()


@pytest.mark.parametrize("engine", ["off", "on"])
def test_resume_after_a_kill_gives_the_same_aggregates(lm, tmp_path, monkeypatch, engine):
    whole = evaluate(*lm, config(engine=engine), tmp_path / "whole", progress=False)
    import rlkv.eval.run as run

    real, calls = run._append, {"n": 0}

    def dying_append(path, records):
        if path.name == "samples.jsonl":
            calls["n"] += 1
            if calls["n"] == 4:  # killed mid-write: half a line lands on disk
                path.open("a").write(json.dumps(records[0])[:25])
                raise KeyboardInterrupt
        real(path, records)

    monkeypatch.setattr(run, "_append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        evaluate(*lm, config(engine=engine), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(run, "_append", real)
    partial = len(read_jsonl(tmp_path / "resumed" / "samples.jsonl"))
    assert 0 < partial < 30
    resumed = evaluate(*lm, config(engine=engine), tmp_path / "resumed", progress=False)
    assert len(resumed.samples) == 30
    strip = lambda rows: [{k: r[k] for k in STABLE} for r in rows]  # noqa: E731
    assert strip(resumed.rows) == strip(whole.rows)


def test_report_renders_tables_and_plots(lm, tmp_path):
    evaluate(*lm, config(), tmp_path / "run", progress=False)
    path = report(tmp_path / "run")
    text = path.read_text()
    assert "| random | 0.5 |" in text and "(+" in text or "(-" in text or "(+0.0)" in text
    for png in ("accuracy_vs_sparsity.png", "accuracy_vs_kv.png", "length_vs_sparsity.png"):
        assert (tmp_path / "run" / png).read_bytes()[:4] == b"\x89PNG"


def test_a_run_with_another_config_is_refused(lm, tmp_path):
    evaluate(*lm, config(tasks=["arith"], methods=["full"]), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="different configuration \\(max_new_tokens: 12 -> 13\\)"):
        evaluate(*lm, config(tasks=["arith"], methods=["full"], max_new_tokens=13), tmp_path / "run", progress=False)


def test_a_run_adds_a_head_ranked_method_but_keeps_each_methods_head_file(lm, tmp_path):
    """Head files are identity per method: rlkv's heads may join a run made with duo's, not replace them."""
    layout = rlkv.Layout.of(lm[0])
    files = {}
    for name, seed in (("duo", 1), ("rlkv", 2), ("other", 3)):
        files[name] = tmp_path / f"{name}.json"
        rlkv.HeadScores.random(layout, seed=seed).save(files[name])
    run = tmp_path / "run"
    base = dict(tasks=["arith"], limit=2)
    evaluate(*lm, config(methods=["full", "duo"], heads={"duo": str(files["duo"])}, **base), run, progress=False)
    evaluate(*lm, config(methods=["rlkv"], heads={"rlkv": str(files["rlkv"])}, **base), run, progress=False)
    heads = json.loads((run / "config.json").read_text())["heads_sha256"]
    assert set(heads) == {"duo", "rlkv"} and heads["duo"] != heads["rlkv"]
    with pytest.raises(ValueError, match=r"different configuration \(heads_sha256\[rlkv\]"):
        evaluate(*lm, config(methods=["rlkv"], heads={"rlkv": str(files["other"])}, **base), run, progress=False)
    path = run / "config.json"  # a run recorded with one hash for all its head-ranked methods
    path.write_text(json.dumps({**json.loads(path.read_text()), "heads_sha256": heads["duo"]}))
    evaluate(*lm, config(methods=["duo"], heads={"duo": str(files["duo"])}, **base), run, progress=False)
    with pytest.raises(ValueError, match=r"heads_sha256\[rlkv\]"):
        evaluate(*lm, config(methods=["rlkv"], heads={"rlkv": str(files["rlkv"])}, **base), run, progress=False)


def test_a_run_made_before_a_setting_existed_resumes_with_its_default(lm, tmp_path):
    evaluate(*lm, config(tasks=["arith"], methods=["full"]), tmp_path / "run", progress=False)
    path = tmp_path / "run" / "config.json"
    old = json.loads(path.read_text())
    del old["match_bytes"]  # as written by rlkv before --match-bytes existed
    path.write_text(json.dumps(old))
    res = evaluate(*lm, config(tasks=["arith", "gsm8k"], methods=["full"]), tmp_path / "run", progress=False)
    assert {r["task"] for r in res.rows} == {"arith", "gsm8k"}
    with pytest.raises(ValueError, match="match_bytes: False -> True"):
        evaluate(*lm, config(tasks=["arith"], methods=["random"], match_bytes=True), tmp_path / "run", progress=False)


def test_a_run_made_before_prefill_existed_was_a_compressed_prefill(lm, tmp_path):
    """Runs recorded without the setting prefilled the compressed way: resuming one under the new default
    (full) is refused, naming it; --prefill compressed goes on with it."""
    evaluate(*lm, config(tasks=["arith"], methods=["full"], prefill="compressed"), tmp_path / "run", progress=False)
    path = tmp_path / "run" / "config.json"
    old = json.loads(path.read_text())
    del old["prefill"]  # as written by rlkv before --prefill existed
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="prefill: 'compressed' -> 'full'"):
        evaluate(*lm, config(tasks=["arith"], methods=["full"]), tmp_path / "run", progress=False)
    res = evaluate(
        *lm, config(tasks=["arith"], methods=["full"], prefill="compressed"), tmp_path / "run", progress=False
    )
    assert {r["task"] for r in res.rows} == {"arith"}


@pytest.mark.parametrize(
    "kw, error, message",
    [
        (dict(tasks=["nope"]), ValueError, "unknown task 'nope'"),
        (dict(methods=["rlkv"]), ValueError, "needs a head scores file"),
        (dict(data_dir="/nonexistent"), FileNotFoundError, "needs data file 'gsm8k_test.jsonl'"),
    ],
)
def test_bad_inputs_leave_nothing_behind(lm, tmp_path, kw, error, message):
    with pytest.raises(error, match=message):
        evaluate(*lm, config(**kw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_without_chat_template_is_refused(tmp_path):
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match="no chat template"):
        evaluate(model, tiny_tokenizer(chat_template=None), config(tasks=["arith"]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_repetition_stop_flags_degenerate_rows():
    stop = RepetitionStop(prompt_len=2, window=8, min_distinct=4)
    ids = torch.tensor([[9, 9] + [5, 6] * 4, [9, 9] + list(range(10, 18))])
    assert stop(ids[:, :-1], None).tolist() == [False, False]  # not at a multiple of the window
    assert stop(ids, None).tolist() == [True, False]
    assert stop.flagged == {0: 8}


def test_a_row_stopped_for_repetition_is_not_read_as_ending_at_its_padding():
    eos = torch.tensor([7, 3])  # the pad token 3 is an EOS id, as Qwen's <|endoftext|> is
    looping = torch.tensor([5, 6, 5, 6, 3, 3])  # stopped after 4 tokens, then padded
    assert generated_end(looping, eos, flagged_at=4) == (4, "repetition")
    ended = torch.tensor([5, 7, 3, 3, 3, 3])  # EOS at 2, then padding that later looked degenerate
    assert generated_end(ended, eos, flagged_at=4) == (2, "eos")
    assert generated_end(torch.tensor([5, 6, 5, 6]), eos, None) == (4, "length")


def test_cli_eval_and_report(lm, tmp_path):
    from typer.testing import CliRunner

    from rlkv.cli import app

    model, tok = lm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tmp_path / "m"),
            "--task",
            "arith",
            "--method",
            "full,random",
            "--sparsity",
            "0.5",
            "--limit",
            "3",
            "--max-new-tokens",
            "6",
            "--out",
            str(tmp_path / "run"),
            "--sink",
            "1",
            "--recent",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "report.md").is_file()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0 and "| random | 0.5 |" in result.output
    bad = CliRunner().invoke(
        app,
        ["eval", "--model", str(tmp_path / "m"), "--task", "arith", "--method", "nope", "--out", str(tmp_path / "x")],
    )
    assert bad.exit_code == 2 and "unknown method 'nope'" in bad.output
    bad = CliRunner().invoke(
        app, ["eval", "--model", str(tmp_path / "m"), "--task", "arith", "--shard", "9/8", "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2 and "--shard expects K/N with 1 <= K <= N, got '9/8'" in bad.output
    assert not (tmp_path / "x").exists()


def test_token_dropping_methods_run_in_the_harness_with_a_budget(lm, tmp_path):
    res = evaluate(
        *lm,
        config(tasks=["arith"], methods=["h2o", "snapkv", "rkv"], budget=40, max_new_tokens=16),
        tmp_path / "run",
        progress=False,
    )
    rows = {r["method"]: r for r in res.rows}
    assert set(rows) == {"h2o", "snapkv", "rkv"}
    for r in rows.values():
        assert 0 < r["kv_peak_ratio"] < 1.0
    with pytest.raises(ValueError, match="budget"):
        evaluate(*lm, config(tasks=["arith"], methods=["h2o"]), tmp_path / "nobudget", progress=False)


def test_cli_identify_writes_heads(lm, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from rlkv.cli import app

    arith = rlkv.tasks.get("arith")  # a random model solves nothing: alternate rewards, half of the samples pass
    monkeypatch.setattr(arith, "grade_many", lambda examples, completions: [float(i % 2) for i in range(len(examples))])
    model, tok = lm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    result = CliRunner().invoke(
        app,
        [
            "identify",
            "--model",
            str(tmp_path / "m"),
            "--task",
            "arith",
            "--out",
            str(tmp_path / "id"),
            "--limit",
            "4",
            "--steps",
            "1",
            "--batch-problems",
            "2",
            "--max-new-tokens",
            "4",
            "--samples-per-problem",
            "2",
            "--min-pass",
            "0.5",
            "--sink",
            "1",
            "--recent",
            "2",
            "--check-limit",
            "3",
            "--check-max-new-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    heads = rlkv.HeadScores.load(tmp_path / "id" / "heads.json")
    assert heads.shape == (2, 2) and heads.method == "rlkv"
    assert "the sparsity penalty acted in 0 of 1 steps" in result.output  # rewards average 0.5 = tau: never above
    assert "sanity check on 3 held-out problems" in result.output and "| rlkv | 0.8 |" in result.output
    check = read_jsonl(tmp_path / "id" / "check" / "samples.jsonl")
    assert len(check) == 3 * 5  # full + rlkv and random at two sparsities
    trained = {e.id for e in rlkv.tasks.get("arith").load(seed=0)[:-3]}
    assert not {s["id"] for s in check} & trained  # held out: never trained on


def test_kv_bytes_average_every_decoding_step_of_a_capped_cache():
    from rlkv.eval.samples import _record_kv_bytes

    class Capped:  # a cache holding at most 5 tokens of 10 bytes
        def sequence_nbytes(self, t):
            return t.clamp(max=5) * 10

    samples = [{"prompt_tokens": 2, "tokens": 6}]
    _record_kv_bytes(samples, Capped(), full_per_token=10)
    s = samples[0]  # lengths 3..8 -> held 30, 40, 50, 50, 50, 50
    assert (s["kv_bytes"], s["kv_bytes_full"]) == (50, 80)
    assert s["kv_bytes_mean"] == pytest.approx(45.0) and s["kv_bytes_full_mean"] == pytest.approx(55.0)


def test_match_bytes_gives_token_droppers_the_head_split_memory(lm, tmp_path):
    from rlkv.methods.matching import mean_bytes

    cfg = config(
        tasks=["arith"], methods=["h2o", "random", "snapkv"], sparsities=[0.5], match_bytes=True, max_new_tokens=16
    )
    res = evaluate(*lm, cfg, tmp_path / "run", progress=False)
    rows = {r["method"]: r for r in res.rows}
    reference = [s for s in res.samples if s["method"] == "random"]
    target = sum(s["kv_bytes_mean"] for s in reference)
    layout = rlkv.Layout.of(lm[0])
    for name in ("h2o", "snapkv"):
        budget = rows[name]["budget"]
        method = rlkv.methods.build(name, layout, 0.5, budget=budget)
        predicted = mean_bytes(functools.partial(method.policy.sequence_bytes, layout), reference)
        assert abs(predicted / target - 1) < 0.02, (name, budget, predicted / target)
        assert (
            abs(rows[name]["kv_mean_ratio"] / rows["random"]["kv_mean_ratio"] - 1) < 0.1
        )  # other outputs, other lengths
    with pytest.raises(ValueError, match="needs a head-split method"):
        evaluate(*lm, config(tasks=["arith"], methods=["h2o"], match_bytes=True), tmp_path / "bad", progress=False)


def test_an_fp8_run_holds_and_matches_fp8_bytes(lm, tmp_path):
    """kv_dtype is a run's setting: its samples' bytes are e4m3 bytes (a quarter of these float32 models'), token
    droppers are matched to them at FP8, and a resume at another precision is refused."""
    from rlkv.methods.matching import mean_bytes

    cfg = config(tasks=["arith"], methods=["h2o", "random"], match_bytes=True, max_new_tokens=16, kv_dtype="fp8")
    res = evaluate(*lm, cfg, tmp_path / "run", progress=False)
    rows = {r["method"]: r for r in res.rows}
    reference = [s for s in res.samples if s["method"] == "random"]
    layout = rlkv.Layout.of(lm[0])
    h2o = rlkv.methods.build("h2o", layout, 0.5, budget=rows["h2o"]["budget"], kv_dtype="fp8")
    predicted = mean_bytes(lambda t: h2o.sequence_bytes(layout, t), reference)
    assert abs(predicted / sum(s["kv_bytes_mean"] for s in reference) - 1) < 0.02
    keep = rlkv.methods.build("random", layout, 0.5, sink=2, recent=4).keep  # the run's heads
    kept, ring_layers = int(keep.sum()), int((~keep).any(dim=1).sum())
    for s in reference:  # kept heads' tokens, the rings (6 slots) and their positions; K/V one byte per element
        n = s["prompt_tokens"] + s["tokens"]
        assert s["kv_bytes"] == n * kept * 2 * 16 + (keep.numel() - kept) * 6 * 2 * 16 + ring_layers * 6 * 8
    with pytest.raises(ValueError, match="different configuration \\(kv_dtype: 'fp8' -> 'bf16'\\)"):
        evaluate(*lm, config(**{**vars(cfg), "kv_dtype": "bf16"}), tmp_path / "run", progress=False)


def test_match_budget_says_when_the_target_is_below_the_methods_floor():
    """A cache that holds its budget plus up to 100 tokens (like R-KV's buffer) cannot match a small target."""
    from types import SimpleNamespace

    from rlkv.methods.matching import TOLERANCE, match_budget, mean_bytes

    def build(budget):
        if budget < 4:
            raise ValueError("budget below the method's window")
        return SimpleNamespace(sequence_bytes=lambda layout, t: t.clamp(max=budget + 100) * 10)

    sample = {"prompt_tokens": 50, "tokens": 200}
    reachable = mean_bytes(lambda t: t.clamp(max=160) * 10, [sample])  # what budget 60 holds
    match = match_budget(build, None, [{**sample, "kv_bytes_mean": reachable}])
    assert match.budget == 60 and abs(match.excess) < 1e-9
    floor = match_budget(build, None, [{**sample, "kv_bytes_mean": 10 * 60.0}])  # 60 tokens: under the floor of 104
    assert floor.budget == 4 and floor.excess > TOLERANCE
    assert floor.predicted == pytest.approx(mean_bytes(lambda t: t.clamp(max=104) * 10, [sample]))


def test_match_bytes_warns_when_a_method_cannot_get_down_to_the_reference(lm, tmp_path):
    """At sparsity 1 every head keeps sink 2 + recent 4 tokens; R-KV keeps at least its window + 1 = 9."""
    cfg = config(
        tasks=["arith"], methods=["random", "rkv"], sparsities=[1.0], match_bytes=True, max_new_tokens=8, limit=3
    )
    with pytest.warns(
        UserWarning, match=r"rkv cannot hold as little KV as random on arith at sparsity 1: its budget of 9"
    ):
        res = evaluate(*lm, cfg, tmp_path / "run", progress=False)
    assert {r["method"]: r for r in res.rows}["rkv"]["kv_vs_reference"] > 1.05


def test_report_marks_matched_groups_that_held_more_than_their_reference():
    from rlkv.eval.report import markdown_table
    from rlkv.eval.summary import summarize

    def sample(method, i, kv, budget=None):
        return {
            "task": "gsm8k",
            "method": method,
            "sparsity": 0.5,
            "id": i,
            "score": 1.0,
            "tokens": 10,
            "finish": "eos",
            "kv_bytes_mean": kv,
            "kv_bytes_full_mean": 200.0,
            "kv_bytes": kv,
            "kv_bytes_full": 200,
            **({"budget": budget} if budget else {}),
        }

    samples = (
        [sample("rlkv", i, 100.0) for i in range(3)]
        + [sample("h2o", i, 101.0, 40) for i in range(3)]
        + [sample("rkv", i, 150.0, 9) for i in range(3)]
        + [sample("snapkv", i, 100.0, 40) for i in range(2)]
    )
    rows = {r["method"]: r for r in summarize(samples, reference="rlkv")}
    assert rows["h2o"]["kv_vs_reference"] == pytest.approx(1.01)
    assert rows["rkv"]["kv_vs_reference"] == pytest.approx(1.5)
    assert rows["rlkv"]["kv_vs_reference"] is None  # the reference itself has no budget
    assert rows["snapkv"]["kv_vs_reference"] == pytest.approx(1.0)  # over the examples it has
    table = markdown_table(list(rows.values()))
    assert "† 1.50x KV" in table and "not at equal memory" in table
    assert table.count("†") == 2  # the rkv cell and the note; h2o's 1% is within what lengths explain
    assert all(r["kv_vs_reference"] is None for r in summarize(samples))  # no reference: a run without --match-bytes


def test_the_engine_grades_like_the_transformers_path(lm, tmp_path):
    """Head-split methods through rlkv.Engine: the same completions, scores and bytes (up to the ring's position
    index)."""
    hf = evaluate(*lm, config(engine="off"), tmp_path / "hf", progress=False)
    eng = evaluate(*lm, config(engine="on"), tmp_path / "engine", progress=False)
    key = lambda s: (s["task"], s["method"], s["id"])  # noqa: E731
    a, b = sorted(hf.samples, key=key), sorted(eng.samples, key=key)
    assert [(s["completion"], s["tokens"], s["finish"], s["score"]) for s in a] == [
        (s["completion"], s["tokens"], s["finish"], s["score"]) for s in b
    ]
    full = [s for s in b if s["method"] == "full"]
    assert all(s["kv_bytes"] == s["kv_bytes_full"] for s in full)
    batches = read_jsonl(tmp_path / "engine" / "batches.jsonl")
    assert all(r["engine"] for r in batches) and [r["batch"] for r in batches] == [3, 2] * 6  # recorded per batch_size


@pytest.mark.parametrize("max_running, cap", [(None, 256), (2, 2)])
def test_the_engine_takes_what_the_budget_admits_unless_capped(lm, tmp_path, monkeypatch, max_running, cap):
    """batch_size (3 here) sizes the transformers batches and the records, not the engine: it runs
    every prompt at once unless max_running caps it."""
    import rlkv.generation as generation

    engines, build = [], generation.engine_for

    def recording(*args, **kwargs):
        engines.append(build(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(generation, "engine_for", recording)
    evaluate(
        *lm,
        config(tasks=["arith"], methods=["full"], engine="on", max_running=max_running),
        tmp_path / "run",
        progress=False,
    )
    (engine,) = engines
    assert engine.max_batch == cap and engine.stats.max_running == min(5, cap)
    assert [r["batch"] for r in read_jsonl(tmp_path / "run" / "batches.jsonl")] == [3, 2]
    assert EvalConfig(tasks=["arith"]).batch_size is None and EvalConfig(tasks=["arith"]).max_running is None


def test_the_engine_grades_token_droppers_like_the_transformers_path(lm, tmp_path):
    """H2O, SnapKV and R-KV through rlkv.Engine: the same completions, scores and KV bytes as transformers generate."""
    runs = [
        evaluate(
            *lm, config(methods=["h2o", "snapkv", "rkv"], budget=40, engine=engine), tmp_path / engine, progress=False
        )
        for engine in ("off", "on")
    ]
    key = lambda s: (s["task"], s["method"], s["id"])  # noqa: E731
    hf, eng = (sorted(r.samples, key=key) for r in runs)
    fields = ("completion", "tokens", "finish", "score", "budget", "kv_bytes", "kv_bytes_mean")
    assert [[s[f] for f in fields] for s in hf] == [[s[f] for f in fields] for s in eng]
    assert all(s["kv_bytes"] < s["kv_bytes_full"] for s in eng if s["prompt_tokens"] + s["tokens"] > 41)
    assert all(r["engine"] for r in read_jsonl(tmp_path / "on" / "batches.jsonl"))


def test_rlkv_and_duo_heads_in_one_run(lm, tmp_path):
    from typer.testing import CliRunner

    from rlkv.cli import app

    model, tok = lm
    layout = rlkv.Layout.of(model)
    files = {}
    for method, seed in (("rlkv", 1), ("duo", 2)):
        scores = rlkv.HeadScores.random(layout, seed=seed)
        scores.method = method
        files[method] = tmp_path / f"{method}.json"
        scores.save(files[method])
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = [
        "eval",
        "--model",
        str(tmp_path / "m"),
        "--task",
        "arith",
        "--method",
        "rlkv,duo",
        "--sparsity",
        "0.5",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "run"),
        "--no-report",
    ]
    result = CliRunner().invoke(app, args + ["--heads", f"rlkv={files['rlkv']}", "--heads", f"duo={files['duo']}"])
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert set(cfg["heads_sha256"]) == {"rlkv", "duo"} and len(set(cfg["heads_sha256"].values())) == 2
    kept = {p["method"]: p["heads_file"] for p in cfg["invocations"][0]["method_params"]}
    assert kept == {"rlkv": str(files["rlkv"]), "duo": str(files["duo"])}
    mixed = CliRunner().invoke(app, args + ["--heads", str(files["rlkv"]), "--heads", f"duo={files['duo']}"])
    assert mixed.exit_code == 2 and "do not mix a plain file with METHOD=FILE" in mixed.output
    with pytest.raises(ValueError, match=r"heads are given for \['h2o'\]"):
        config(methods=["rlkv"], heads={"h2o": "x.json"})


def outcomes(samples: list[dict]) -> list[tuple]:
    """What a run generated and graded, in a fixed order."""
    return sorted(
        (s["task"], s["method"], s["sparsity"], s["id"], s["completion"], s["tokens"], s["score"], s.get("budget"))
        for s in samples
    )


def test_shards_one_after_the_other_make_the_unsharded_run(lm, tmp_path):
    whole = evaluate(*lm, config(), tmp_path / "whole", progress=False)
    run = tmp_path / "run"
    for k in (1, 2):
        evaluate(*lm, config(), run, progress=False, shard=Shard(k, 2))
    assert not (run / "samples.jsonl").exists()
    groups = {
        k: {(s["task"], s["method"], s["sparsity"]) for s in read_jsonl(run / f"samples.shard-{k}-of-2.jsonl")}
        for k in (1, 2)
    }  # groups in evaluate's order, every other one
    assert groups[1] == {("arith", "full", 0.0), ("arith", "random", 0.5), ("gsm8k", "streaming", 1.0)}
    assert groups[2] == {("arith", "streaming", 1.0), ("gsm8k", "full", 0.0), ("gsm8k", "random", 0.5)}
    assert outcomes(run_records(run, "samples")) == outcomes(whole.samples)
    assert len(run_records(run, "batches")) == len(read_jsonl(tmp_path / "whole" / "batches.jsonl"))
    by_group = lambda rows: {(r["task"], r["method"], r["sparsity"]): {k: r[k] for k in STABLE} for r in rows}  # noqa: E731
    assert by_group(json.loads((run / "summary.json").read_text())["rows"]) == by_group(whole.rows)
    (run / "summary.json").unlink()
    text = report(run).read_text()  # writes summary.json anew from every shard's samples
    assert all(f"| {m} | {sp} | " in text for m, sp in (("full", 0), ("streaming", 1), ("random", 0.5)))
    assert by_group(json.loads((run / "summary.json").read_text())["rows"]) == by_group(whole.rows)

    with (run / "samples.shard-2-of-2.jsonl").open("a") as f:
        f.write('{"task": "ari')  # shard 2 mid-write: the others read past it and leave it alone
    files = {p.name: p.read_bytes() for p in run.glob("*.jsonl")}
    again = evaluate(*lm, config(), run, progress=False, shard=Shard(1, 2))  # resumes: nothing left to do
    evaluate(*lm, config(), run, progress=False)  # unsharded over the shards' files: nothing left either
    assert {p.name: p.read_bytes() for p in run.glob("*.jsonl")} == files
    assert by_group(again.rows) == by_group(whole.rows)
    shards = [i["shard"] for i in json.loads((run / "config.json").read_text())["invocations"]]
    assert shards == ["1/2", "2/2", "1/2", None]


def test_an_archived_run_reads_as_before_and_refuses_additions(lm, tmp_path):
    import gzip

    run = tmp_path / "run"
    for k in (1, 2):
        evaluate(*lm, config(), run, progress=False, shard=Shard(k, 2))
    before = report(run).read_text()
    for path in run.glob("*.jsonl"):  # gzip -9 OUT/*.jsonl
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    assert report(run).read_text() == before
    with pytest.raises(ValueError, match=r"archived \(samples.shard-1-of-2.jsonl.gz\)"):
        evaluate(*lm, config(), run, progress=False, shard=Shard(1, 2))
    (run / "batches.shard-1-of-2.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds both batches.shard-1-of-2.jsonl and batches.shard-1-of-2.jsonl.gz"):
        report(run)


def test_shard_parse():
    assert Shard.parse(" 2/8 ") == Shard(2, 8) and str(Shard(2, 8)) == "2/8"
    assert [g for g in range(20) if Shard(2, 8).owns(g)] == [1, 9, 17]
    for text in ("9/8", "0/8", "1/0", "2", "a/b", "1/2/3", "-1/2", "", "1.0/2"):
        with pytest.raises(ValueError, match=re.escape(f"--shard expects K/N with 1 <= K <= N, got {text!r}")):
            Shard.parse(text)
    with pytest.raises(ValueError, match="a shard is K of N with 1 <= K <= N, got 3 of 2"):
        Shard(3, 2)


def test_match_bytes_in_a_shard_needs_the_whole_reference_group(lm, tmp_path):
    cfg = lambda **kw: config(tasks=["arith"], match_bytes=True, max_new_tokens=16, **kw)  # noqa: E731
    whole = evaluate(*lm, cfg(methods=["random", "h2o"]), tmp_path / "whole", progress=False)
    run = tmp_path / "run"
    waiting = "takes its budget from the KV bytes of random there, which has {} of 5 samples"
    with pytest.raises(ValueError, match=waiting.format(0) + ".*that group must finish first"):
        evaluate(*lm, cfg(methods=["random", "h2o"]), run, progress=False, shard=Shard(2, 2))  # h2o; random is 1/2's
    evaluate(*lm, cfg(methods=["random"]), run, progress=False)  # the reference, unsharded
    reference = (run / "samples.jsonl").read_text()
    (run / "samples.jsonl").write_text("".join(reference.splitlines(keepends=True)[:3]))  # as if still being written
    with pytest.raises(ValueError, match=waiting.format(3)):
        evaluate(*lm, cfg(methods=["random", "h2o"]), run, progress=False, shard=Shard(2, 2))
    (run / "samples.jsonl").write_text(reference)
    res = evaluate(*lm, cfg(methods=["random", "h2o"]), run, progress=False, shard=Shard(2, 2))
    assert outcomes(res.samples) == outcomes(whole.samples)  # the same matched budget and so the same outputs
    assert {s["budget"] for s in res.samples if s["method"] == "h2o"} == {
        r["budget"] for r in whole.rows if r["budget"]
    }


def test_a_matched_group_is_compared_with_the_method_it_was_matched_to(lm, tmp_path):
    """A later invocation whose first head-ranked method is another must not change the comparison."""
    files = tmp_path / "rlkv.json"
    rlkv.HeadScores.random(rlkv.Layout.of(lm[0]), seed=5).save(files)
    cfg = lambda **kw: config(tasks=["arith"], match_bytes=True, max_new_tokens=16, **kw)  # noqa: E731
    run = tmp_path / "run"
    evaluate(*lm, cfg(methods=["random", "h2o"]), run, progress=False)
    res = evaluate(*lm, cfg(methods=["rlkv"], heads={"rlkv": str(files)}), run, progress=False)
    group = lambda m: {s["id"]: s["kv_bytes_mean"] for s in res.samples if s["method"] == m}  # noqa: E731
    h2o, random_heads, rlkv_heads = group("h2o"), group("random"), group("rlkv")
    row = next(r for r in res.rows if r["method"] == "h2o")
    assert {s["matched_to"] for s in res.samples if s["method"] == "h2o"} == {"random"} == {row["matched_to"]}
    assert row["kv_vs_reference"] == pytest.approx(sum(h2o.values()) / sum(random_heads[i] for i in h2o))
    assert row["kv_vs_reference"] != pytest.approx(sum(h2o.values()) / sum(rlkv_heads[i] for i in h2o))


def test_concurrent_shard_processes_make_one_run(lm, tmp_path):
    """Three `rlkv eval --shard K/3` processes at once into one directory, then `rlkv report`."""
    from typer.testing import CliRunner

    from rlkv.cli import app

    model, tok = lm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "rlkv",
        "eval",
        "--model",
        str(tmp_path / "m"),
        "--task",
        "arith",
        "--method",
        "full,streaming,random",
        "--sparsity",
        "0.5",
        "--limit",
        "3",
        "--max-new-tokens",
        "6",
        "--sink",
        "1",
        "--recent",
        "2",
        "--out",
        str(run),
    ]
    src = str(Path(rlkv.__file__).parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "2",
    }
    procs = [
        subprocess.Popen(
            args + ["--shard", f"{k}/3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for k in (1, 2, 3)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert "shard 2/3 done; when all 3 are, run `rlkv report" in outputs[1]
    invocations = json.loads((run / "config.json").read_text())["invocations"]
    assert sorted(i["shard"] for i in invocations) == ["1/3", "2/3", "3/3"]  # none lost to another's rewrite
    for k, method in ((1, "full"), (2, "streaming"), (3, "random")):
        assert {s["method"] for s in read_jsonl(run / f"samples.shard-{k}-of-3.jsonl")} == {method}
    samples = run_records(run, "samples")
    assert len(samples) == 9 and len({(s["method"], s["id"]) for s in samples}) == 9
    assert not (run / "report.md").exists()
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0 and all(f"| {m} |" in result.output for m in ("full", "streaming", "random"))


def test_a_second_process_on_the_same_shard_is_refused(lm, tmp_path):
    """Two processes appending to one shard's files would tear and duplicate its samples."""
    from rlkv.eval.rundir import sole_writer

    run, cfg = tmp_path / "run", config(tasks=["arith"], methods=["full"], limit=2)
    with sole_writer(run, Shard(1, 2)):  # as another process running shard 1/2 holds it
        with pytest.raises(ValueError, match=r"another process is running shard 1/2 into .* samples\.shard-1-of-2"):
            evaluate(*lm, cfg, run, progress=False, shard=Shard(1, 2))
        assert not (run / "config.json").exists()  # refused before it recorded anything
        evaluate(*lm, cfg, run, progress=False, shard=Shard(2, 2))  # the other shards go on
        with pytest.raises(ValueError, match=r"running shard 1/2 into .* as an unsharded eval"):
            evaluate(*lm, cfg, run, progress=False)
    res = evaluate(*lm, cfg, run, progress=False, shard=Shard(1, 2))  # free once the holder is gone
    assert len(res.samples) == 2


def test_shards_starting_together_lose_no_invocation(tmp_path):
    """config.json's read-check-rewrite under the run's lock: without it, most of these 16 are lost."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import fields

    from rlkv.eval.config import IDENTITY
    from rlkv.eval.run import _open_run

    defaults = {f.name: f.default for f in fields(EvalConfig)}
    record = {k: defaults.get(k) for k in IDENTITY}
    run = tmp_path / "new" / "run"
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: _open_run(run, record, {"shard": f"{k}/16"}, Shard(k, 16)), range(1, 17)))
    invocations = json.loads((run / "config.json").read_text())["invocations"]
    assert sorted(int(i["shard"].split("/")[0]) for i in invocations) == list(range(1, 17))


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(methods=["full"], sparsities=[1.5]),
            "sparsity must be a number in [0, 1] (fraction of KV heads compressed; "
            "full and streaming take one too), got 1.5",
        ),
        (dict(methods=["streaming"], sparsities=[float("nan")]), "sparsity must be a number in [0, 1]"),
        (dict(methods=["full", "streaming"], sparsities=[0.5, -0.1]), "got -0.1"),
        (dict(sparsities=[True]), "got True"),
        (dict(sparsities=[]), "EvalConfig sparsities must be a non-empty list, got []"),
        (dict(tasks="arith"), "EvalConfig tasks must be a non-empty list, got 'arith'"),
        (dict(batch_size=0), "EvalConfig batch_size must be an integer >= 1, got 0"),
        (dict(limit=2.5), "EvalConfig limit must be an integer >= 1, got 2.5"),
        (dict(recent=0), "EvalConfig recent must be an integer >= 1, got 0"),
        (dict(temperature=float("inf")), "temperature must be a number >= 0 (0 = greedy), got inf"),
        (dict(top_p=float("nan")), "top_p must be a number in [0, 1], got nan"),
    ],
)
def test_eval_config_refuses_bad_settings_for_every_method(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config(**kw)
