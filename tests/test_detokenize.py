"""Streaming detokenization: deltas concatenate to the full decode (cut at the first stop string),
and never contain half a UTF-8 character or the start of a stop string before it is resolved."""

import random
import time

import pytest
from conftest import tiny_tokenizer

from rlkv.serve.detokenize import Detokenizer


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: every UTF-8 byte is its own token (ids 3..258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + [alphabet[b] for b in range(256)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def stream(tokenizer, tokens, stop, rng):
    detok, deltas, i = Detokenizer(tokenizer, stop), [], 0
    while i < len(tokens):
        k = rng.randint(1, 3)
        deltas.append(detok.add(tokens[i : i + k]))
        i += k
    return deltas + [detok.finish()], detok


def cut(text, stop):
    return text[: min((text.find(s) for s in stop if s in text), default=len(text))]


@pytest.mark.parametrize("make", [byte_tokenizer, tiny_tokenizer])
def test_deltas_concatenate_to_the_full_decode_cut_at_the_first_stop(make):
    tok = make()
    text = "héllo wörld 日本 😀! lo w"
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    for trial in range(150):
        rng = random.Random(trial)
        tokens = [rng.choice(ids) for _ in range(rng.randint(1, 40))]
        stop = rng.choice([[], ["ö"], ["lo w", "日"], ["😀!"], ["l"], ["ll", "w"]])
        deltas, detok = stream(tok, tokens, stop, rng)
        full = tok.decode(tokens, skip_special_tokens=True)
        assert "".join(deltas) == cut(full, stop), (tokens, stop)
        assert detok.stopped == any(s in full for s in stop)


def test_valid_text_streams_whole_characters_only():
    tok = byte_tokenizer()
    text = "héllo wörld 日本 😀!"
    detok = Detokenizer(tok)
    deltas = [detok.add([t]) for t in tok(text, add_special_tokens=False).input_ids] + [detok.finish()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert "日" in deltas and "😀" in deltas  # each multi-byte character comes out whole, with its last byte


def test_text_that_may_start_a_stop_string_is_held_until_resolved():
    tok = byte_tokenizer()
    detok = Detokenizer(tok, ["END"])
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    assert detok.add(ids("abcE")) == "abc"  # "E" may start "END"
    assert detok.add(ids("x")) == "Ex"  # it did not
    assert detok.add(ids("EN")) == ""
    assert detok.add(ids("D and more")) == "" and detok.stopped
    assert detok.finish() == "" and detok.text == "abcEx"
    held = Detokenizer(tok, ["END"])
    assert held.add(ids("zEN")) == "z" and held.finish() == "EN"  # finished without the stop: released


@pytest.mark.real_model
def test_smollm2_tokenizer_streams_exactly():
    from conftest import SMOLLM2
    from transformers import AutoTokenizer

    if not SMOLLM2.is_file():
        pytest.skip(f"real weights absent: run ../shared/tools/get-model smollm2-135m-instruct (expected {SMOLLM2})")
    tok = AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    text = "Let's solve: 3 × 4 = 12, so \\boxed{12}. Naïve café — 日本語 😀\n```py\nprint('hi')  # done\n```"
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    for trial in range(20):
        rng = random.Random(trial)
        tokens = ids[rng.randrange(len(ids) // 2) :]
        stop = rng.choice([[], ["12"], ["日本", "café"], ["```\n"]])
        deltas, _ = stream(tok, tokens, stop, rng)
        assert "".join(deltas) == cut(tok.decode(tokens, skip_special_tokens=True), stop), (tokens, stop)


def test_stop_strings_cost_time_linear_in_the_new_text():
    """Four stop strings of 1,024 characters (4,096 in all, the most a request may send) with a long tail
    held back at every token: each delta costs about what it costs without stop strings (the old matcher
    compared every prefix of every stop string with the held text at every token: quadratic)."""
    tok = byte_tokenizer()
    stops = ["a" * 1023 + end for end in "bcde"]
    tokens = tok("a" * 3000 + "d", add_special_tokens=False).input_ids

    def run(stop):
        detok, start = Detokenizer(tok, stop), time.perf_counter()
        deltas = [detok.add([t]) for t in tokens] + [detok.finish()]
        return "".join(deltas), time.perf_counter() - start

    plain, plain_s = run([])
    cut, stops_s = run(stops)
    assert plain == "a" * 3000 + "d" and cut == "a" * (3000 - 1023)
    assert stops_s < 3 * plain_s + 0.5, (stops_s, plain_s)
