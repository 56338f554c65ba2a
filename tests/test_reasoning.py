"""The reasoning parsers against vLLM's rules: a leading <think> dropped, reasoning up to </think>, content after it, an
answer cut before </think> all reasoning; qwen3's answer all content where the prompt closed the thinking. However
the text is cut into deltas, the pieces join to the same split."""

import pytest
from conftest import thinking_tokenizer

from rlkv.serve.reasoning import ReasoningParser

CASES = [
    ("<think>\nstep one</think>\n\nThe answer is 4.", "\nstep one", "\n\nThe answer is 4."),
    ("step one, no start tag</think>42", "step one, no start tag", "42"),
    ("  <think>x</think>", "x", ""),
    ("still thinking when cut <thi", "still thinking when cut <thi", ""),
    ("a </think tag that never closes", "a </think tag that never closes", ""),
    ("<think>a</think>b</think>c", "a", "b</think>c"),
]


def split(parser, prompt, text, cuts):
    """(reasoning, content, reasoning tokens) of `text` fed in pieces cut at `cuts`, one token per piece."""
    splitter = parser.split(prompt)
    ends = [*cuts, len(text)]
    reasoning = content = ""
    end_id = parser.end_id
    for start, end in zip([0, *cuts], ends):
        piece = text[start:end]
        r, c = splitter.add(piece, [end_id] if piece.endswith("</think>") else [7])
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    return reasoning + r, content + c, splitter.reasoning_tokens


@pytest.mark.parametrize("name", ["deepseek-r1", "qwen3"])
@pytest.mark.parametrize("text, reasoning, content", CASES)
def test_any_cut_of_the_text_splits_alike(name, text, reasoning, content):
    parser = ReasoningParser(name, thinking_tokenizer())
    for cuts in ([], list(range(1, len(text))), [3, 9, 10, 11, 17]):
        cuts = [c for c in cuts if c < len(text)]
        got = split(parser, [1, 5], text, cuts)
        assert got[:2] == (reasoning, content), cuts


def test_reasoning_tokens_count_up_to_the_end_tag():
    parser = ReasoningParser("deepseek-r1", thinking_tokenizer())
    splitter = parser.split([1])
    splitter.add("ab", [10, 11])
    splitter.add("c</think>d", [12, parser.end_id, 13])
    splitter.add("e", [14])
    assert splitter.reasoning_tokens == 4
    cut = parser.split([1])
    cut.add("ab", [10, 11])
    assert cut.reasoning_tokens == 2  # never closed: all of it


def test_qwen3_answers_in_content_when_the_prompt_closed_the_thinking():
    tok = thinking_tokenizer()
    closed = tok("<|assistant|><think>\n\n</think>\n\n").input_ids
    opened = tok("<|assistant|><think>\n").input_ids
    qwen3, r1 = ReasoningParser("qwen3", tok), ReasoningParser("deepseek-r1", tok)
    assert split(qwen3, closed, "plain answer", [5])[:2] == ("", "plain answer")
    assert split(qwen3, opened, "thought</think>answer", [5])[:2] == ("thought", "answer")
    assert split(r1, closed, "plain answer", [5])[:2] == ("plain answer", "")


def test_a_tokenizer_without_the_tags_is_refused():
    from conftest import tiny_tokenizer

    with pytest.raises(ValueError, match="needs <think> and </think> in the tokenizer's vocabulary"):
        ReasoningParser("qwen3", tiny_tokenizer())
    with pytest.raises(ValueError, match="must be one of deepseek-r1, qwen3"):
        ReasoningParser("granite", thinking_tokenizer())
