"""HeadScores: ranking, files, plots and refusals."""

import json

import pytest
import torch

from rlkv import HeadScores, Layout
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
