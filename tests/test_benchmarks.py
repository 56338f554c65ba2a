"""The GPU benchmark scripts run end to end on a tiny saved model on the CPU (so they cannot rot between GPU
sessions)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DATA_DIR, DEVICE, REPO, offset_keys_model, saved_tiny_model, tiny_model, tiny_tokenizer

import rlkv
from rlkv.methods.headsplit import HeadSplit


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2")


@pytest.fixture
def random_heads(tmp_path):
    """Random head scores for the tiny qwen2 model, as a heads file."""
    heads = tmp_path / "heads.json"
    rlkv.HeadScores.random(rlkv.Layout.of(tiny_model("qwen2")), seed=0).save(heads)
    return heads


def run(script: str, *args: str, **env_extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **env_extra}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_engine_benchmark_writes_every_part(saved, tmp_path):
    out = tmp_path / "engine.json"
    run(
        "engine.py",
        "--model",
        str(saved),
        "--parts",
        "hf,sweep,kernel,tune,profile,droppers,sampling",
        "--sampling-batches",
        "2",
        "--hf-batches",
        "2",
        "--hf-new-tokens",
        "4",
        "--requests",
        "3",
        "--new-tokens",
        "4",
        "--kv-budget",
        "8MiB",
        "--max-batch",
        "2",
        "--sparsities",
        "0,0.5",
        "--kernel-batch",
        "2",
        "--kernel-context",
        "32",
        "--kernel-kv-dtypes",
        "bf16,fp8",
        "--profile-tokens",
        "12",
        "--tune-splits",
        "1,2",
        "--tune-blocks",
        "16",
        "--tune-warps",
        "4",
        "--tune-stages",
        "2",
        "--dropper-budget",
        "40",
        "--profile-droppers",
        "h2o",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert result["complete"] and "command" in result["environment"]
    assert {r["part"] for r in result["rows"]} == {"hf", "sweep", "kernel", "tune", "profile", "droppers", "sampling"}
    sampling = [r for r in result["rows"] if r["part"] == "sampling"]
    modes = ["greedy", "sample", "top_k", "filter", "threshold_kernel", "threshold_sort"]
    assert [r["mode"] for r in sampling] == modes
    assert all(r["batch"] == 2 and r["vocab"] == 96 and r["microseconds"] > 0 for r in sampling)
    kernel = {r["kv_dtype"]: r for r in result["rows"] if r["part"] == "kernel"}
    assert set(kernel) == {"bf16", "fp8"} and all(
        r["kv_gb_per_s"] > 0 and r["mtokens_per_s"] > 0 for r in kernel.values()
    )
    droppers = [r for r in result["rows"] if r["part"] == "droppers"]
    assert [r["method"] for r in droppers] == ["full", "h2o", "snapkv", "rkv"] and droppers[0]["speedup"] == 1.0
    assert all(r["tokens"] == 3 * 4 for r in droppers)
    assert all(r["kv_ratio"] < 1 for r in droppers[1:3])  # h2o, snapkv: 40 of the prompt's tokens (R-KV holds 128 more)
    tune = [r for r in result["rows"] if r["part"] == "tune"]
    assert sorted(r["splits"] for r in tune) == [1, 2] and all(r["max_abs_diff"] < 1e-4 for r in tune)
    sweep = [r for r in result["rows"] if r["part"] == "sweep"]
    assert [r["sparsity"] for r in sweep] == [0.0, 0.5] and sweep[0]["speedup"] == pytest.approx(1.0)
    assert sweep[0]["loaded_speedup"] == pytest.approx(1.0)  # 3 requests, 2 at a time: one waited
    profile = [r for r in result["rows"] if r["part"] == "profile"]
    assert [(r["method"], r["sparsity"]) for r in profile] == [("split", 0.0), ("split", 0.5), ("h2o", None)]
    assert all(r["ms_per_step"] > 0 for r in profile)
    assert [r["batch"] for r in profile] == [2, 2, 2] and profile[0][
        "top_kernels"
    ] == []  # the cap; CPU: no GPU kernels


def test_efficiency_benchmark_grades_each_sparsity(saved, random_heads, tmp_path):
    heads = random_heads
    out = tmp_path / "eff.json"
    run(
        "efficiency.py",
        "--model",
        str(saved),
        "--heads",
        str(heads),
        "--task",
        "arith",
        "--limit",
        "2",
        "--sparsities",
        "0,0.5",
        "--max-new-tokens",
        "4",
        "--max-batch",
        "2",
        "--kv-budget",
        "8MiB",
        "--out",
        str(out),
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["admission"], r["sparsity"]) for r in rows] == [
        ("demand", 0.0),
        ("demand", 0.5),
        ("reserve", 0.0),
        ("reserve", 0.5),
    ]
    assert rows[0]["speedup_e2e"] == pytest.approx(1.0) and rows[2]["vs_reserve"] == pytest.approx(1.0)
    assert all(0 <= r["accuracy"] <= 1 and r["mean_tokens"] > 0 and r["preemptions"] >= 0 for r in rows)


def test_hf_cache_benchmark_measures_each_configuration(saved, tmp_path):
    out = tmp_path / "hf.json"
    run(
        "hf_cache.py",
        "--model",
        str(saved),
        "--batches",
        "1,2",
        "--new-tokens",
        "4",
        "--sparsities",
        "0,0.5",
        "--droppers",
        "h2o,snapkv,rkv",
        "--warmup-tokens",
        "1",
        "--profile-tokens",
        "2",
        "--static-baseline",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["complete"] and "command" in result["environment"] and "device" in result["environment"]
    assert result["environment"]["host"].endswith(f"{os.cpu_count()} cores")  # eager rows depend on the host
    for batch in (1, 2):
        mine = [r for r in rows if r["batch"] == batch]
        assert [r["config"].split(" b=")[0] for r in mine] == [
            "DynamicCache",
            "rlkv s=0",
            "rlkv s=0.5",
            "h2o",
            "snapkv",
            "rkv",
            "DynamicCache (again)",
            "StaticCache",
            "StaticCache (again)",
        ]  # the compiler runs after every eager row
        assert all(r["tokens"] == batch * 4 for r in mine)  # exactly --new-tokens per row
        assert all(r["profile"]["wall_ms_per_step"] > 0 and r["profile"]["top_ms_per_step"] for r in mine)
        assert mine[2]["kv_bytes_end"] < mine[1]["kv_bytes_end"] == mine[0]["kv_bytes_end"] == mine[7]["kv_bytes_end"]
        assert all(r["budget"] >= 1 and r["matched_to"] == "rlkv s=0.5" for r in mine[3:6])
        assert max(mine[0]["speedup"], mine[6]["speedup"]) == pytest.approx(1.0)  # against the faster baseline
        assert max(mine[7]["vs_static"], mine[8]["vs_static"]) == pytest.approx(1.0)


def test_hf_cache_rounds_alternate_the_order_and_report_medians(saved, tmp_path):
    out = tmp_path / "hf.json"
    run(
        "hf_cache.py",
        "--model",
        str(saved),
        "--batches",
        "2",
        "--new-tokens",
        "3",
        "--sparsities",
        "0",
        "--droppers",
        "",
        "--warmup-tokens",
        "1",
        "--rounds",
        "3",
        "--random-weights",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert result["random_weights"]  # the saved model's config, freshly initialised
    order = ["DynamicCache", "rlkv s=0", "DynamicCache (again)"]
    assert [(r["round"], r["config"]) for r in result["rows"]] == [
        *((0, c) for c in order),
        *((1, c) for c in order[::-1]),
        *((2, c) for c in order),
    ]
    medians = {(m["method"], m["runs"]): m for m in result["medians"]}
    assert set(medians) == {("full", 6), ("rlkv", 3)}
    full = sorted(r["tok_per_s"] for r in result["rows"] if r["method"] == "full")
    assert medians["full", 6]["median_tok_per_s"] == pytest.approx((full[2] + full[3]) / 2)
    assert medians["full", 6]["vs_dynamic"] == pytest.approx(1.0)


def test_decode_limit_benchmark_sets_each_step_against_its_bytes(saved, tmp_path):
    out = tmp_path / "limit.json"
    run(
        "decode_limit.py",
        "--model",
        str(saved),
        "--batches",
        "2,3",
        "--sparsities",
        "0,0.5",
        "--context",
        "120",
        "--profile-tokens",
        "2",
        "--kv-dtypes",
        "bf16,fp8",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["complete"] and result["weight_bytes"] > 0 and result["copy_gb_per_s"] > 0
    assert [(r["compile"], r["kv_dtype"], r["sparsity"], r["batch"]) for r in rows] == [
        (False, k, s, b) for k in ("bf16", "fp8") for s in (0.0, 0.5) for b in (2, 3)
    ]  # --compile auto: the engine's default, off on a CPU
    fp8 = rows[4:]
    assert [4 * r["kv_bytes"] for r in fp8[:2]] == [r["kv_bytes"] for r in rows[:2]]  # e4m3 against float32
    rows = rows[:4]
    assert rows[1]["kv_bytes"] == 3 * rows[0]["kv_bytes"] // 2 and rows[2]["kv_bytes"] < rows[0]["kv_bytes"]
    assert all(r["floor_ms"] > 0 for r in rows)
    pages = -(-120 // 16)  # the engine's 16-token pages
    assert [r["distinct_pages"] for r in rows] == [2 * pages, 3 * pages] * 2  # each sequence reads its own
    assert all(r["profiled"] == "eager" and r["groups_ms"] == {} for r in rows)  # a CPU: no graph, no GPU kernels


def test_decode_limit_refuses_a_pool_that_cannot_hold_the_whole_batch_at_once():
    """A step timed with fewer sequences resident than it reports would read less K/V than its floor counts."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from decode_limit import resident_engine, warm_tokens

    model = tiny_model("qwen2")
    layout = rlkv.Layout.of(model)
    method = HeadSplit(torch.ones(layout.shape, dtype=torch.bool), 4, 8)
    page = 16 * layout.kv_bytes_per_token()  # the engine's 16-token pages; page 0 is scratch
    assert warm_tokens(3, 280) == 11  # 280 + 11 tokens: 19 pages each
    engine, ids = resident_engine(model, tiny_tokenizer(), method, (1 + 3 * 19) * page, 3, 280)
    assert engine.stats.max_running == 3 and len(ids) == 3
    with pytest.raises(SystemExit, match="only 2 of 3 sequences of 280 tokens"):  # not even 3 prompts (18 pages)
        resident_engine(model, tiny_tokenizer(), method, (1 + 3 * 18 - 1) * page, 3, 280)


def test_decode_limit_holds_every_prompt_of_a_batch_prefilled_one_forward_at_a_time():
    """The engine decodes between prefill forwards: 16 prompts of a forward each (as 256 of 4,096 tokens are on a
    GPU) were not all resident at once with 8 new tokens (7 of 256 were, on an H100); `warm_tokens` are."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import decode_limit

    model = tiny_model("qwen2")
    layout = rlkv.Layout.of(model)
    method = HeadSplit(torch.ones(layout.shape, dtype=torch.bool), 4, 8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_limit, "PREFILL_TOKENS", 200)  # one prompt per prefill forward
        batch, context = 16, 200
        budget = batch * (context + decode_limit.warm_tokens(batch, context) + 64) * layout.kv_bytes_per_token()
        engine, _ = decode_limit.resident_engine(model, tiny_tokenizer(), method, budget, batch, context)
    assert engine.stats.max_running == batch and engine.stats.prefill_forwards >= batch


def test_serving_benchmark_measures_each_sparsity_and_rate(saved, random_heads, tmp_path):
    heads = random_heads
    out = tmp_path / "serving.json"
    run(
        "serving.py",
        "--model",
        str(saved),
        "--heads",
        str(heads),
        "--task",
        "arith",
        "--num-requests",
        "3",
        "--rates",
        "8,32,inf",
        "--max-tokens",
        "4",
        "--kv-budget",
        "8MiB",
        "--max-batch",
        "4",
        "--warmup",
        "2",
        "--sparsities",
        "0,0.5",
        "--engines",
        "process,thread",
        "--out",
        str(out),
        OMP_NUM_THREADS="1",
    )
    result = json.loads(out.read_text())
    assert result["complete"] and "command" in result["environment"]
    assert "--sparsity 0.5" in result["server_command_process_bf16_s0.5"]
    assert "--engine-thread" in result["server_command_thread_bf16_s0"]
    rows = result["rows"]
    assert [(r["engine"], r["sparsity"], r["rate"]) for r in rows] == [
        (e, s, r) for e in ("process", "thread") for s in (0.0, 0.5) for r in (8.0, 32.0, "inf")
    ]
    assert all(r["completed"] == 3 and r["failed"] == 0 and 0 < r["output_tokens"] <= 12 for r in rows)
    assert all(0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["latency_p99_s"] and r["output_tok_s"] > 0 for r in rows)
    assert all(r["max_running"] <= 4 and r["preemptions"] == 0 for r in rows)  # polled: a short run may show 0
    assert [r["throughput_ratio"] for r in rows[:3] + rows[6:9]] == [1.0] * 6  # each transport's own sparsity 0


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_a_decode_graph_the_engine_never_ran_is_captured_with_its_attention():
    """decode_limit times the graph of a batch its warm-up never decoded at once: captured outside the engine's
    session, that graph would run the model's own attention and store no K/V."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from engine import _decode_graph

    model = tiny_model("qwen2").to(DEVICE)
    keep = torch.ones(rlkv.Layout.of(model).shape, dtype=torch.bool)
    engine = rlkv.Engine(model, tiny_tokenizer(), HeadSplit(keep, 4, 8), kv_budget=2**24, max_batch=8)
    engine.generate([[5, 6, 7] * 20] * 2, max_new_tokens=3, eos_token_ids=[])  # decodes 2 at once: bucket 2
    graph = _decode_graph(engine, 8, 40)  # bucket 8, never decoded
    with torch.inference_mode():  # the graph's input buffers are inference tensors
        engine.runner._static[0, :8] = 5  # token 0 embeds to zeros (the padding row): its K would be zero too
    store = engine.store
    page = int(store.page_table[1, 40 // store.page_size])
    store.pages_k[0][page, 40 % store.page_size].zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert store.pages_k[0][page, 40 % store.page_size].abs().sum() > 0  # the step stored the new token's K
    assert model.config._attn_implementation == "sdpa"  # the engine's session closed again


def test_long_generation_benchmark_sets_each_step_against_its_floor(saved, tmp_path):
    """Fixed-length outputs at two sparsities under a pool too small for every sequence at sparsity 0 (preemptions
    and their recompute), then a natural-EOS row on task prompts, graded."""
    out = tmp_path / "long.json"
    common = ["--model", str(saved), "--max-batch", "4", "--sink", "4", "--recent", "8", "--compile", "off"]
    run(
        "long_generation.py",
        *common,
        "--kv-budget",
        "150KiB",
        *("--sparsities", "0,0.5", "--num-requests", "5", "--input-len", "20", "--output-len", "30", "--ignore-eos"),
        *("--max-concurrency", "4", "--out", str(out)),
    )
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["complete"] and "command" in result["environment"] and "device" in result["environment"]
    assert result["copy_gb_per_s"] > 0 and result["weight_bytes"] > 0 and result["mean_prompt_tokens"] == 20
    assert [(r["compile"], r["sparsity"]) for r in rows] == [(False, 0.0), (False, 0.5)]
    for r in rows:
        assert r["completed"] == 5 and r["output_tokens"] == 5 * 30 and r["finish"] == {"length": 5}
        assert r["problems"] == [] and r["max_running"] <= 4 and r["decode_steps"] > 0
        assert (
            0 < r["ttft_s_p50"] <= r["ttft_s_p99"] and 0 < r["tpot_ms_p50"] and 0 < r["itl_ms_p50"] <= r["itl_ms_p99"]
        )
        assert 0 < r["floor_ms_p50"] and 0 < r["of_floor"] and r["mean_kv_gb_per_step"] > 0
    full, half = rows
    assert full["throughput_ratio"] == 1.0 and full["vs_uncompiled"] == 1.0
    assert full["preemptions"] > 0 and full["recomputed_tokens"] >= 20 * full["preemptions"]
    assert full["recompute_s_est"] > 0 and 0 < full["recompute_share"] and full["prefill_tok_s"] > 0
    assert half["kv_ratio"] < full["kv_ratio"] == 1.0 and half["pool_pages"] > full["pool_pages"]

    graded = tmp_path / "graded.json"
    run(
        "long_generation.py",
        *common,
        *("--kv-budget", "2MiB", "--sparsities", "0", "--num-requests", "3", "--task", "arith", "--output-len", "6"),
        *("--kv-dtypes", "bf16,fp8", "--temperature", "0.6", "--top-p", "0.95", "--out", str(graded)),
    )  # R1's sampling settings: top-p without top-k, the filter's threshold
    result = json.loads(graded.read_text())
    assert (result["temperature"], result["top_p"], result["top_k"]) == (0.6, 0.95, 0)
    rows = result["rows"]
    assert [r["kv_dtype"] for r in rows] == ["bf16", "fp8"] and rows[1]["throughput_ratio"] > 0
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and row["completed"] == 3 and 1 <= row["max_output_tokens"] <= 6
    assert rows[1]["kv_ratio"] == pytest.approx(rows[0]["kv_ratio"] / 4)  # e4m3 against the float32 full cache


def test_serving_benchmark_serves_fixed_length_random_prompts(saved, tmp_path):
    """Long-generation shape over HTTP: random prompts as plain completions, exactly --max-tokens tokens each
    (--ignore-eos), at most 2 in flight."""
    out = tmp_path / "serving.json"
    run(
        "serving.py",
        *("--model", str(saved), "--input-len", "12", "--max-tokens", "5", "--ignore-eos", "--max-concurrency", "2"),
        *("--num-requests", "4", "--rates", "inf", "--kv-budget", "8MiB", "--max-batch", "4", "--warmup", "2"),
        *("--sparsities", "0", "--engines", "thread", "--temperature", "0.6", "--top-p", "0.95", "--top-k", "20"),
        *("--out", str(out)),
        OMP_NUM_THREADS="1",
    )
    result = json.loads(out.read_text())
    assert (result["temperature"], result["top_p"], result["top_k"]) == (0.6, 0.95, 20)
    (row,) = result["rows"]
    assert row["completed"] == 4 and row["failed"] == 0 and row["output_tokens"] == 4 * 5
    assert row["max_running"] <= 2  # the client's cap
    assert 0 < row["itl_p50_ms"] <= row["itl_p90_ms"] <= row["itl_p99_ms"] and row["tpot_p90_ms"] > 0


def test_serving_benchmark_scales_over_replicas(saved, tmp_path):
    """--data-parallel 1,2: the same requests against one engine process and against two behind one server,
    each row's scaling against the one-replica row (on a CPU the two share its cores: only the shape is tested)."""
    out = tmp_path / "replicas.json"
    run(
        "serving.py",
        *("--model", str(saved), "--input-len", "12", "--max-tokens", "4", "--ignore-eos", "--data-parallel", "1,2"),
        *("--num-requests", "4", "--rates", "inf", "--kv-budget", "8MiB", "--max-batch", "4", "--warmup", "2"),
        *("--sparsities", "0", "--out", str(out)),
        OMP_NUM_THREADS="1",
    )
    result = json.loads(out.read_text())
    one, two = result["rows"]
    assert (one["replicas"], two["replicas"]) == (1, 2) and one["scaling"] == 1.0 and two["scaling"] > 0
    assert all(r["completed"] == 4 and r["failed"] == 0 and r["output_tokens"] == 16 for r in (one, two))
    assert "--data-parallel 2" in result["server_command_process_bf16_s0_dp2"]
    assert "--data-parallel" not in result["server_command_process_bf16_s0"]


def test_lm_eval_harness_through_the_server_equals_a_forward(saved, tmp_path):
    """lm-evaluation-harness's local-completions model runs a multiple-choice (loglikelihood) and a GSM8K
    (generate_until) task through `rlkv serve`, full cache and sparsity 0.5 with a compressed prefill: every
    log-likelihood and is-greedy flag equals a forward's (inside `compress`), every generation `rlkv.generate`'s."""
    out = tmp_path / "lm_eval.json"
    run(
        "lm_eval_harness.py",
        "--model",
        str(saved),
        "--mc-items",
        "3",
        "--gen-items",
        "2",
        "--max-gen-toks",
        "6",
        "--sink",
        "2",
        "--recent",
        "4",
        "--kv-budget",
        "4MiB",
        "--out",
        str(out),
        OMP_NUM_THREADS="1",
    )
    full, half = json.loads(out.read_text())["rows"]
    for row in (full, half):
        assert row["mc_choices"] == 12 and row["max_loglikelihood_diff"] < 1e-4
        assert row["is_greedy_equal"] == 12 and row["generations_equal"] == row["generations"] == 2
    assert half["mean_loglikelihood"] != full["mean_loglikelihood"]  # the compressed prompt scores differently


def test_shared_prompt_benchmark_holds_fewer_bytes_with_identical_samples(saved, tmp_path):
    out = tmp_path / "shared.json"
    run(
        "shared_prompt.py",
        "--model",
        str(saved),
        "--n",
        "4",
        "--prompt-tokens",
        "40",
        "--max-tokens",
        "12",
        "--sink",
        "2",
        "--recent",
        "4",
        "--kv-budget",
        "4MiB",
        "--out",
        str(out),
    )
    for row in json.loads(out.read_text())["rows"]:
        assert row["identical"] and row["kv_bytes_shared"] < row["kv_bytes_separate"]
        assert row["first_difference"] == [None] * row["n"]
        assert row["peak_pages_separate"] - row["peak_pages_shared"] == 3 * (40 // 16)  # 3 forks share 2 full pages
        assert row["prefill_forwards_shared"] == 1


def test_kv_fidelity_benchmark_shows_what_centred_keys_save(tmp_path):
    """Teacher-forced on a model whose keys sit on a large offset (as Qwen2's do): FP8 with centred keys moves
    its predictions far less than FP8 without centres, whose damage is the keys' (values alone move them little)."""
    model = offset_keys_model()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    examples = rlkv.tasks.get("gsm8k").load(data_dir=DATA_DIR, limit=3)
    samples = tmp_path / "samples.jsonl"
    rows = [
        {"task": "gsm8k", "method": "full", "id": e.id, "completion": f"{e.answer} is the answer."} for e in examples
    ]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "fidelity.json"
    run("kv_fidelity.py", "--model", str(tmp_path / "model"), "--samples", str(samples), "--data-dir", str(DATA_DIR),
        "--out", str(out))  # fmt: skip
    result = {r["precision"]: r for r in json.loads(out.read_text())["rows"]}
    assert result["fp8"]["tokens"] == result["fp8-uncentred"]["tokens"] > 3 * 5  # every answer's tokens, each row
    assert 3 * result["fp8"]["mean_kl"] < result["fp8-uncentred"]["mean_kl"]
    assert 3 * result["fp8-values"]["mean_kl"] < result["fp8-uncentred"]["mean_kl"]  # the damage is the keys'
