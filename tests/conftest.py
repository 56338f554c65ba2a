"""Shared fixtures: tiny random-config models of every supported architecture, built in-process."""

import os
from pathlib import Path

if os.environ.get("RLKV_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in its interpreter on a CPU

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA_DIR = SHARED / "data"
MODEL_CACHE = Path.home() / ".cache" / "rlkv-models"
SMOLLM2 = MODEL_CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEVICE = torch.device(os.environ.get("RLKV_TEST_DEVICE", "cpu"))  # set to cuda to run the model tests on a GPU

ARCHS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}


def tiny_model(arch: str, layers: int = 3, q_heads: int = 4, kv_heads: int = 2, seed: int = 0, **extra):
    """A random-weight model of `arch` small enough for exact fp32 tests on a CPU."""
    config = ARCHS[arch](
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    return model.eval().to(DEVICE)


def offset_keys_model():
    """`tiny_model("qwen2")` whose keys sit far off zero on some channels, as Qwen2.5's key bias puts them (what
    FP8 must round): each head's slowest RoPE pair (theta 1e6, Qwen2.5's: it barely turns) biased by 300 in K
    and by 3 in Q, so the scores feel it."""
    model = tiny_model("qwen2", rope_theta=1e6)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.view(2, 16)[:, [7, 15]] += 300.0
            layer.self_attn.q_proj.bias.view(4, 16)[:, [7, 15]] += 3.0
    return model


def saved_tiny_model(path, arch: str = "qwen2", tokenizer=None):
    """`tiny_model(arch)` and `tiny_tokenizer()` (or `tokenizer`) saved with save_pretrained into `path` (a model
    directory)."""
    tiny_model(arch).save_pretrained(path)
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return path


def left_padded_batch(lengths, total, seed=0):
    """Left-padded random prompts (ids, mask) with the given real lengths, on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (len(lengths), total), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
    return ids.masked_fill(mask == 0, 0).to(DEVICE), mask.to(DEVICE)


@pytest.fixture(params=list(ARCHS))
def arch(request):
    return request.param


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 96, chat_template: str | None = CHAT_TEMPLATE):
    """A character-level tokenizer (ids < vocab_size) with a small chat template, built in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)][: vocab_size - len(specials)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok


def thinking_tokenizer():
    """`tiny_tokenizer` with `<think>` and `</think>` as tokens of their own (ids 94 and 95, in the tiny vocabulary),
    plain added tokens as in R1's and Qwen3's tokenizers, so decoding keeps them."""
    tok = tiny_tokenizer(vocab_size=94)
    tok.add_tokens(["<think>", "</think>"])
    return tok


def tiny_gguf(
    path: Path, layers: int = 2, hidden: int = 64, q_heads: int = 4, kv_heads: int = 2, seed: int = 0
) -> Path:
    """A random-weight llama GGUF (Q8_0 projections, a gpt2-style character tokenizer, a chat template)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    rng = np.random.default_rng(seed)
    tokens = ["<pad>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)] + ["ab", "abc"]
    ffn, head_dim = 2 * hidden, hidden // q_heads
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(q_heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["a b", "ab c"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    def tensor(name: str, *shape: int, quantized: bool = False):
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if quantized:
            writer.add_tensor(
                name, quants.quantize(values, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0
            )
        else:
            writer.add_tensor(name, values)

    tensor("token_embd.weight", len(tokens), hidden)
    tensor("output_norm.weight", hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        for name, rows, cols in (
            ("attn_q", q_heads * head_dim, hidden),
            ("attn_k", kv_heads * head_dim, hidden),
            ("attn_v", kv_heads * head_dim, hidden),
            ("attn_output", hidden, q_heads * head_dim),
            ("ffn_gate", ffn, hidden),
            ("ffn_up", ffn, hidden),
            ("ffn_down", hidden, ffn),
        ):
            tensor(f"blk.{i}.{name}.weight", rows, cols, quantized=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
