"""Fixtures for the task tests: the shared data directory and tokenizers with chat templates."""

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).parents[2].parent / "shared" / "data"
SMOLLM2 = Path.home() / ".cache" / "rlkv-models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "SOURCES.md").is_file():
        pytest.skip(f"task data not found at {DATA_DIR} (expected ../shared/data next to the repo)")
    return DATA_DIR


def make_tiny_tokenizer(chat_template: str | None):
    """A word-level tokenizer built in-process, named 'tiny-test'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", name_or_path="tiny-test")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer(TINY_TEMPLATE)


@pytest.fixture(scope="session")
def tokenizer_without_template():
    return make_tiny_tokenizer(None)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    if not SMOLLM2.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM2} (fetch it with ../shared/tools/get-model)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
