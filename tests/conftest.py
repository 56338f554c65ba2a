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
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok
