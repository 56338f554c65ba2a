"""Model loading, layouts and the real SmolLM2 weights."""

import os
import struct

import pytest
import torch
from conftest import SMOLLM2, tiny_gguf, tiny_model
from transformers import GPT2Config

import rlkv
from rlkv.hf.plumbing import output_cache
from rlkv.models import check_supported


def test_layout_of_tiny_models(arch):
    layout = rlkv.Layout.of(tiny_model(arch, layers=3, q_heads=4, kv_heads=2))
    assert (layout.arch, layout.num_layers, layout.num_q_heads, layout.num_kv_heads, layout.head_dim) == (
        arch,
        3,
        4,
        2,
        16,
    )
    assert layout.group_size == 2 and layout.shape == (3, 2)
    assert layout.kv_bytes_per_token() == 2 * 3 * 2 * 16 * 4


def test_unsupported_arch_names_the_supported_ones():
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2': rlkv supports llama, mistral, qwen2, qwen3"):
        check_supported(GPT2Config())


def test_load_model_from_a_saved_directory(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), eos_token="<unk>"
    )
    tok.save_pretrained(tmp_path)
    loaded, tokenizer = rlkv.load_model(tmp_path, device="cpu")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert rlkv.Layout.of(loaded).shape == (3, 2)
    ids = torch.tensor([[1, 5, 7]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("/nonexistent/model.gguf", FileNotFoundError, "GGUF file not found"),
        ("/nonexistent/dir/model", FileNotFoundError, "model path not found"),
    ],
)
def test_bad_model_specs(spec, error, message):
    with pytest.raises(error, match=message):
        rlkv.load_model(spec)


@pytest.mark.parametrize(
    "content, what",
    [
        (b"", "is empty"),
        (b"<html>not found</html>", "does not start with the GGUF magic bytes (it starts with b'<htm')"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1, 5), "cannot be read as GGUF ("),  # the header of a file cut short
    ],
)
def test_a_bad_gguf_file_is_named(tmp_path, content, what):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        rlkv.load_model(path, device="cpu")
    assert str(err.value).startswith(f"{path} {what}")
    assert str(err.value).endswith("expected a complete GGUF model file (a truncated download? fetch it again)")


def test_unsupported_saved_model_is_refused_before_loading_weights(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        rlkv.load_model(tmp_path, device="cpu")


def _same_model(a, b):
    (model_a, tok_a), (model_b, tok_b) = a, b
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    text = "abc ab, a?"
    assert tok_a(text).input_ids == tok_b(text).input_ids and tok_a.chat_template == tok_b.chat_template
    assert (tok_a.pad_token, tok_a.eos_token, tok_a.padding_side) == (
        tok_b.pad_token,
        tok_b.eos_token,
        tok_b.padding_side,
    )
    assert model_a.generation_config.eos_token_id == model_b.generation_config.eos_token_id


def test_a_gguf_is_converted_once_then_loaded_from_the_cache(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("RLKV_CACHE", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "tiny.gguf")
    said = []
    first = rlkv.load_model(path, device="cpu", say=said.append)
    (converted,) = (tmp_path / "cache" / "gguf").iterdir()
    assert said == [f"converting tiny.gguf to float32, once (a minute or more; kept in {converted})"]
    assert capfd.readouterr() == ("", "")  # no progress bars: the conversion, the load, the shards written
    assert converted.name.startswith("tiny-float32-") and (converted / "model.safetensors").is_file()
    stat = path.stat()  # same size and time, unreadable content: only the cache can serve this load
    path.write_bytes(b"GGUF" + b"\0" * (stat.st_size - 4))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = rlkv.load_model(path, device="cpu", say=said.append)
    assert len(said) == 1  # nothing converted, nothing said
    _same_model(first, second)
    assert second[0].config._name_or_path == str(path) == rlkv.Layout.of(second[0]).name


def test_a_gguf_loads_unpacked_and_quietly_in_any_dtype(tmp_path, monkeypatch, capfd):
    """transformers may keep GGUF weights packed (and warns about anything but float32): rlkv unpacks them."""
    monkeypatch.setenv("RLKV_CACHE", "off")
    model, _ = rlkv.load_model(tiny_gguf(tmp_path / "tiny.gguf"), device="cpu", dtype="bfloat16")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear and model.dtype == torch.bfloat16
    assert capfd.readouterr().err == ""


def test_a_changed_gguf_is_converted_again_and_the_cache_can_be_off(tmp_path, monkeypatch):
    monkeypatch.setenv("RLKV_CACHE", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "tiny.gguf")
    rlkv.load_model(path, device="cpu")
    tiny_gguf(path, seed=1)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    model, _ = rlkv.load_model(path, device="cpu")
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 2
    monkeypatch.setenv("RLKV_CACHE", "off")
    direct = rlkv.load_model(path, device="cpu")
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 2  # nothing written
    assert torch.equal(direct[0].model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_an_unwritable_cache_warns_and_still_loads(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("RLKV_CACHE", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="could not cache the converted GGUF"):
        model, _ = rlkv.load_model(tiny_gguf(tmp_path / "tiny.gguf"), device="cpu")
    assert rlkv.Layout.of(model).shape == (2, 2)


@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2.is_file():
        pytest.skip(f"real weights absent: run ../shared/tools/get-model smollm2-135m-instruct (expected {SMOLLM2})")
    return rlkv.load_model(SMOLLM2, device="cpu")


@pytest.mark.real_model
def test_smollm2_sparsity_zero_equals_plain_generate(smollm2):
    model, tok = smollm2
    msgs = [[{"role": "user", "content": q}] for q in ("What is 12 times 7? Think step by step.", "Name a prime.")]
    enc = tok(
        [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs],
        return_tensors="pt",
        padding=True,
    )
    plain = model.generate(**enc, max_new_tokens=64, do_sample=False)
    with rlkv.compress(model, rlkv.HeadScores.random(rlkv.Layout.of(model)), sparsity=0.0):
        fast = model.generate(**enc, max_new_tokens=64, do_sample=False)
    assert torch.equal(plain, fast)


@pytest.mark.real_model
def test_smollm2_kv_bytes_at_half_sparsity_after_512_tokens(smollm2):
    model, tok = smollm2
    layout = rlkv.Layout.of(model)
    enc = tok(["Write a long story about a dragon who learns arithmetic."], return_tensors="pt")
    new = 512 - enc.input_ids.shape[1]
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    plain = model.generate(**enc, **kw, return_dict_in_generate=True)
    full_bytes = rlkv.cache_nbytes(output_cache(plain))
    with rlkv.compress(model, rlkv.HeadScores.random(layout), sparsity=0.5, sink=16, recent=64) as handle:
        out = model.generate(**enc, **kw)
        held = handle.cache.nbytes()
    assert out.shape[1] == 512 and output_cache(plain).get_seq_length() == 511
    assert full_bytes == 511 * layout.kv_bytes_per_token()
    bound = 0.5 + 0.5 * 80 / 512
    overhead = 64 * 1024  # ring positions: 30 layers x 80 slots x int64, well under 64 KiB
    assert held <= bound * full_bytes + overhead, (held / full_bytes, bound)
    assert held / full_bytes > 0.5


@pytest.mark.real_model
@pytest.mark.parametrize("kind", ["headsplit", "h2o"])
def test_smollm2_engine_equals_compressed_generate(smollm2, kind):
    model, tok = smollm2
    heads = rlkv.HeadScores.random(rlkv.Layout.of(model), seed=0)
    msgs = [[{"role": "user", "content": q}] for q in ("What is 12 times 7? Think step by step.", "Name a prime.")]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    if kind == "h2o":  # a budget below the prompts' length: tokens are dropped from the prefill on
        method = rlkv.methods.build("h2o", rlkv.Layout.of(model), 0.5, budget=24)
    else:
        method = rlkv.methods.HeadSplit.from_scores(heads, 0.5, sink=4, recent=16)
    with method.apply(model):
        ref = model.generate(**enc, max_new_tokens=48, do_sample=False)
    outs = rlkv.Engine(model, tok, method, kv_budget="256MiB", max_batch=2).generate(texts, max_new_tokens=48)
    for row, out in zip(ref[:, enc.input_ids.shape[1] :].tolist(), outs):
        end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        assert out.tokens == row[:end]
