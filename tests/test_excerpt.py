"""Quotes in one-line messages: cut after a sentence or a word, never inside a word."""

from rlkv.excerpt import excerpt

TORCH = (
    "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
    "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
    "succeed, but it can result in arbitrary code execution.\nPlease file an issue."
)


def test_a_short_first_line_is_kept_whole():
    assert excerpt("file not found\nmore detail") == "file not found"
    assert excerpt("") == "" and excerpt("  padded  ") == "padded"


def test_a_long_line_keeps_its_first_whole_sentences():
    assert excerpt(TORCH) == "Weights only load failed."
    assert excerpt(TORCH, 200) == TORCH.split(" Re-running")[0]


def test_without_a_sentence_end_it_stops_after_a_whole_word():
    text = "expected tab separated numbers but found something else entirely here"
    assert excerpt(text, 30) == "expected tab separated…"  # "numbers" would end at 30, leaving no room for "…"
    assert excerpt(text, 31) == "expected tab separated numbers…"


def test_a_single_long_word_is_cut_to_the_width():
    assert excerpt("x" * 50, 10) == "x" * 9 + "…"
