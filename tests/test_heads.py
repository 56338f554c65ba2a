"""HeadScores: ranking, files, plots and refusals."""

import json

import numpy as np
import pytest
import torch

from rlkv import HeadScores, Layout, patterns
from rlkv.heads import num_kept

LAYOUT = Layout("llama", num_layers=4, num_q_heads=8, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.25, 0.5, 0.6, 0.8, 1.0])
def test_keep_mask_keeps_exactly_round_count_of_the_best(sparsity):
    scores = torch.randn(6, 4)
    keep = HeadScores(scores).keep_mask(sparsity)
    n = num_kept(sparsity, 24)
    assert n == int((1 - sparsity) * 24 + 0.5)
    assert int(keep.sum()) == n
    if 0 < n < 24:
        assert scores[keep].min() >= scores[~keep].max()


def test_ties_break_towards_lower_layer_then_head():
    keep = HeadScores(torch.ones(3, 2)).keep_mask(0.5)
    assert keep.tolist() == [[True, True], [True, False], [False, False]]


def test_threshold():
    s = HeadScores(torch.tensor([[0.1, 0.9], [0.5, 0.4]]))
    assert s.keep_mask(threshold=0.5).tolist() == [[False, True], [True, False]]
    with pytest.raises(ValueError, match="exactly one of"):
        s.keep_mask(0.5, threshold=0.5)


def test_json_round_trip_keeps_metadata(tmp_path):
    s = HeadScores(torch.rand(4, 2), model="m", layout=LAYOUT.to_dict(), method="rlkv", provenance={"steps": 3})
    back = HeadScores.load(s.save(tmp_path / "h.json"))
    assert torch.equal(back.scores, s.scores)
    assert (back.model, back.layout, back.method, back.provenance) == ("m", LAYOUT.to_dict(), "rlkv", {"steps": 3})


def test_published_tsv_formats(tmp_path):
    (tmp_path / "adapter_weights.tsv").write_text("0.9\t0.1\n0.2\t0.8\n0.5\t0.5\n")
    (tmp_path / "full_attention_heads.tsv").write_text("1\t0\n0\t1\n1\t1\n")
    rl = HeadScores.load(tmp_path / "adapter_weights.tsv")
    duo = HeadScores.load(tmp_path / "full_attention_heads.tsv")
    assert rl.method == "rlkv" and duo.method == "duo"
    torch.testing.assert_close(rl.scores, torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]))
    assert duo.shape == (3, 2)
    back = HeadScores.load(rl.save(tmp_path / "out.tsv"))
    assert torch.equal(back.scores, rl.scores)


def test_plot_writes_a_png(tmp_path):
    path = HeadScores.random(LAYOUT).plot(tmp_path / "h.png", sparsity=0.5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_is_titled_with_the_model_name_and_labels_kept_heads(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    scores = HeadScores(torch.arange(6.0).view(3, 2), model="/home/someone/models/Qwen2.5-0.5B-Instruct")
    scores.plot(tmp_path / "h.png", sparsity=0.5)
    (fig,) = figures
    assert fig._suptitle.get_text() == "Qwen2.5-0.5B-Instruct"
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert labels == ["kept: full cache", "compressed: sink + recent"]
    assert any(ax.get_ylabel().startswith("score") for ax in fig.axes)  # the colour bar says what it shows


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: HeadScores(torch.tensor([[1.0, float("nan")]])), "finite numbers, found nan at layer 0, head 1"),
        (lambda p: HeadScores(torch.rand(3)), "2-D \\(layers x kv_heads\\)"),
        (lambda p: HeadScores.load(p / "missing.json"), "head scores file not found"),
        (lambda p: HeadScores.random(LAYOUT).keep_mask(1.5), "sparsity must be a number in \\[0, 1\\]"),
        (lambda p: HeadScores.random(LAYOUT).keep_mask(-0.1), "sparsity must be a number in \\[0, 1\\]"),
        (lambda p: HeadScores(torch.rand(32, 8)).check_layout(LAYOUT), "32x8 .* has 4x2"),
    ],
)
def test_bad_inputs_get_one_clear_line(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        make(tmp_path)
    assert "\n" not in str(err.value)


def test_malformed_files(tmp_path):
    (tmp_path / "ragged.tsv").write_text("1\t2\n3\n")
    (tmp_path / "words.tsv").write_text("1\t2\nx\ty\n")
    (tmp_path / "bad.json").write_text(json.dumps({"gates": []}))
    with pytest.raises(ValueError, match="different lengths"):
        HeadScores.load(tmp_path / "ragged.tsv")
    with pytest.raises(ValueError, match="words.tsv:2: expected tab-separated numbers"):
        HeadScores.load(tmp_path / "words.tsv")
    with pytest.raises(ValueError, match="'scores' matrix"):
        HeadScores.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: HeadScores(None), "matrix of numbers .* got NoneType"),
        (lambda: HeadScores([[0.1, 0.2], [0.3]]), "rows have different lengths \\[1, 2\\]"),
        (lambda: HeadScores.random(LAYOUT).keep_mask(True), "sparsity must be a number in \\[0, 1\\].* got True"),
        (lambda: HeadScores.random(LAYOUT).keep_mask(threshold=float("nan")), "threshold must be a number"),
        (lambda: HeadScores.random(LAYOUT).keep_mask(0.5, rule="duo"), "unknown keep rule 'duo'"),
        (lambda: HeadScores.load("duo:llama-9"), "unknown head pattern 'duo:llama-9': expected one of duo:"),
        (lambda: HeadScores.load("rlkv:qwen-2.5-7b-r1"), "not shipped with rlkv .* no licence"),
    ],
)
def test_more_bad_inputs_get_one_clear_line(make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        make()
    assert "\n" not in str(err.value)


def _authors_sparsify(scores, sparsity):
    """RLKV eval/bench/pred.py + base/duo_attn/utils.py sparsify_attention_heads (6dadf85), verbatim in effect."""
    np.random.seed(42)  # pred.py's seed_everything(42) before the first numpy draw
    heads = np.clip(np.array(scores, dtype=float), 0, 1)
    heads += np.random.uniform(0, 1e-6, heads.shape)
    threshold = np.quantile(heads, sparsity)
    if sparsity >= 1:
        threshold = 2
    if sparsity <= 0:
        threshold = -1
    return heads >= threshold


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0])
def test_authors_rule_replicates_their_code(sparsity):
    duo = HeadScores.load("duo:meta-llama-3.1-8b-instruct")  # many heads exactly at 1.0
    wide = HeadScores(torch.randn(28, 2, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.7)  # outside [0, 1] too
    for scores in (duo, wide):
        mine = scores.keep_mask(sparsity, rule="authors")
        assert torch.equal(mine, torch.from_numpy(_authors_sparsify(scores.scores.numpy(), sparsity)))
    assert int((duo.scores == 1).sum()) > 10


def test_authors_rule_count_can_differ_from_rank_and_breaks_ties_by_seeded_noise():
    scores = HeadScores(torch.rand(28, 2, generator=torch.Generator().manual_seed(1)))  # 56 heads, as Qwen2.5-1.5B
    kept = {
        s: (int(scores.keep_mask(s, rule="authors").sum()), int(scores.keep_mask(s).sum())) for s in (0.5, 0.6, 0.8)
    }
    assert kept == {0.5: (28, 28), 0.6: (23, 22), 0.8: (12, 11)}  # 56 - ceil(s * 55) against round((1 - s) * 56)
    tied = HeadScores(torch.ones(3, 2))
    picks = {tuple(tied.keep_mask(0.5, rule="authors", seed=seed).flatten().tolist()) for seed in range(8)}
    assert len(picks) > 1 and all(sum(p) == 3 for p in picks)  # the noise, not the index, decides
    assert torch.equal(tied.keep_mask(0.5, rule="authors", seed=3), tied.keep_mask(0.5, rule="authors", seed=3))


def test_the_rule_recorded_in_provenance_is_the_default():
    scores = torch.rand(28, 2, generator=torch.Generator().manual_seed(1))
    authors = HeadScores(scores, provenance={"keep_rule": "authors"})
    assert torch.equal(authors.keep_mask(0.6), HeadScores(scores).keep_mask(0.6, rule="authors"))
    assert torch.equal(authors.keep_mask(0.6, rule="rank"), HeadScores(scores).keep_mask(0.6))
    assert HeadScores.load("duo:mistral-7b-instruct-v0.2").keep_rule == "authors"


def test_authors_adapter_weight_pt_is_read(tmp_path):
    """The layout of the authors' AReaL save_adapter_weight: one bf16 vector per layer, keyed by parameter name."""
    gates = torch.rand(12, 2).bfloat16()
    order = [3, 11, 0, 10, 1, 2, 9, 4, 8, 5, 7, 6]  # key order must not matter (layers 10, 11 sort before 2 as text)
    torch.save(
        {
            "adapter_weight_dict": {f"model.layers.{i}.self_attn.adapter.weight": gates[i] for i in order},
            "model_name": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        },
        tmp_path / "adapter_weight.pt",
    )
    loaded = HeadScores.load(tmp_path / "adapter_weight.pt")
    assert torch.equal(loaded.scores, gates.float()) and loaded.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert loaded.method == "rlkv" and torch.equal(HeadScores.load(tmp_path).scores, gates.float())  # its directory
    torch.save({"something": 1}, tmp_path / "other.pt")
    torch.save({"adapter_weight_dict": {"model.layers.1.self_attn.adapter.weight": gates[1]}}, tmp_path / "gap.pt")
    (tmp_path / "broken.pt").write_bytes(b"\x80\x04not really a pickle")
    (tmp_path / "garbage.bin").write_bytes(b"not a torch file at all")
    for name, message in (
        ("other.pt", "expected the authors' adapter_weight.pt"),
        ("gap.pt", "layers \\[1\\]"),
        ("broken.pt", "broken.pt: not a torch file of gates \\(UnpicklingError: .*[.…]\\)$"),
        ("garbage.bin", "garbage.bin: not a torch file of gates \\(a torch file is a zip or a pickle; this one"),
    ):
        with pytest.raises(ValueError, match=message) as err:
            HeadScores.load(tmp_path / name)
        assert "\n" not in str(err.value)


def test_the_authors_directory_layout_is_read(tmp_path):
    root = tmp_path / "head_dist" / "rlkv"
    for model in ("Qwen-2.5-7B-R1", "Llama-3.1-8B-R1"):
        run = root / model / "lr1e-2_ep2_bs32_reg1e-3"
        run.mkdir(parents=True)
        (run / "adapter_weights.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
        (run / "lr1e-2_ep2_bs32_reg1e-3.png").write_bytes(b"\x89PNG")
    by_model = HeadScores.load(root / "Qwen-2.5-7B-R1")
    assert by_model.method == "rlkv" and by_model.shape == (2, 2)
    assert torch.equal(HeadScores.load(root / "Qwen-2.5-7B-R1" / "lr1e-2_ep2_bs32_reg1e-3").scores, by_model.scores)
    with pytest.raises(ValueError, match="holds 2 head patterns .*Llama-3.1-8B-R1/lr1e-2.*: give the directory of one"):
        HeadScores.load(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no head pattern found"):
        HeadScores.load(tmp_path / "empty")


def test_published_patterns_ship_with_their_licence():
    names = patterns.published()
    assert set(names) == {
        "duo:llama-2-7b-32k-instruct",
        "duo:llama-3-8b-instruct-gradient-1048k",
        "duo:llama-3-8b-instruct-gradient-4194k",
        "duo:meta-llama-3.1-8b-instruct",
        "duo:mistral-7b-instruct-v0.2",
        "duo:mistral-7b-instruct-v0.3",
    }
    shapes = {name: HeadScores.published(name).shape for name in names}
    assert shapes["duo:meta-llama-3.1-8b-instruct"] == (32, 8) and shapes["duo:llama-2-7b-32k-instruct"] == (32, 32)
    assert "MIT License" in (patterns.DATA / "duo" / "LICENSE").read_text()
    assert "fe93c314ae87306ef6629dc16713250b4718ffe7" in (patterns.DATA / "duo" / "SOURCES.md").read_text()


def test_methods_pass_the_rule_through(tmp_path):
    import rlkv

    layout = Layout("qwen2", num_layers=28, num_q_heads=12, num_kv_heads=2, head_dim=128)
    scores = HeadScores(
        torch.rand(28, 2, generator=torch.Generator().manual_seed(1)), provenance={"keep_rule": "authors"}
    )
    path = scores.save(tmp_path / "heads.json")
    own = rlkv.methods.build("rlkv", layout, 0.6, heads=path)
    rank = rlkv.methods.build("rlkv", layout, 0.6, heads=path, keep_rule="rank")
    rand = rlkv.methods.build("random", layout, 0.6, keep_rule="authors")
    assert (own.describe()["kept_heads"], rank.describe()["kept_heads"], rand.describe()["kept_heads"]) == (23, 22, 23)
    assert (own.params["keep_rule"], rank.params["keep_rule"], rand.params["keep_rule"]) == (
        "authors",
        "rank",
        "authors",
    )
    assert torch.equal(rlkv.methods.HeadSplit.from_scores(path, 0.6).keep, own.keep)
    duo = rlkv.methods.build("duo", Layout("llama", 32, 32, 8, 128), 0.5, heads="duo:meta-llama-3.1-8b-instruct")
    assert duo.params["keep_rule"] == "authors" and len(duo.params["heads_sha256"]) == 64
    with pytest.raises(ValueError, match="keep_rule must be one of rank, authors"):
        rlkv.EvalConfig(tasks=["arith"], keep_rule="quantile")
