"""Loading a model and describing its attention layout.

Everything in rlkv is decided per KV head, so the one fact the rest of the code needs about a
model is its `Layout`: how many layers, query heads, KV heads, the head size and the dtype.
`load_model` accepts what users have at hand (a Hugging Face hub id, a local directory saved
with `save_pretrained`, or a single `.gguf` file) and returns the model with a tokenizer set up
for batched generation (left padding, a pad token).

A `.gguf` is de-quantized and converted once, then kept as a safetensors directory under
`$RLKV_CACHE/gguf/` (default `~/.cache/rlkv/gguf/`, one directory per file, dtype and
transformers version), so later loads skip the slow GGUF parsing. Delete the directory to
reclaim the space; `RLKV_CACHE=off` turns the cache off.

Only decoder-only GQA architectures whose attention goes through transformers'
`AttentionInterface` are supported; the list is `SUPPORTED_ARCHS`, and anything else is refused
up front with a message naming them, before any weights are read.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rlkv.sources import GGUF_FIX, model_source

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Layout:
    """Attention layout of a model: decisions in rlkv are made per (layer, kv_head)."""

    arch: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    name: str | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def shape(self) -> tuple[int, int]:
        """(layers, kv_heads): the shape of every per-head decision."""
        return (self.num_layers, self.num_kv_heads)

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token costs across all layers and KV heads."""
        itemsize = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config, dtype: torch.dtype | str | None = None, name: str | None = None) -> Layout:
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        check_supported(config)
        num_q = config.num_attention_heads
        num_kv = getattr(config, "num_key_value_heads", None) or num_q
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q
        dtype = dtype if dtype is not None else getattr(config, "dtype", None) or torch.float32
        dtype = str(dtype).removeprefix("torch.")
        return cls(config.model_type, config.num_hidden_layers, num_q, num_kv, head_dim, dtype, name)

    @classmethod
    def of(cls, model) -> Layout:
        name = getattr(model.config, "_name_or_path", None) or None
        return cls.from_config(model.config, dtype=model.dtype, name=name)


def check_supported(config) -> None:
    """Refuse architectures rlkv does not know, naming the supported ones."""
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"unsupported architecture {arch!r}: rlkv supports {', '.join(SUPPORTED_ARCHS)} "
            "(decoder-only GQA models using transformers' attention interface)"
        )


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` ("bfloat16", "float32", ...), or a one-line error."""
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}: expected a torch dtype name such as bfloat16 or float32")
    return value


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def _gguf_read_errors(path: Path | None):
    """A load that fails on a .gguf the gguf reader cannot parse (cut short) names the file, in one line."""
    try:
        yield
    except Exception:
        if path is None or (problem := _gguf_problem(path)) is None:
            raise
        raise ValueError(f"{path} cannot be read as GGUF ({problem}): {GGUF_FIX}") from None


def _gguf_problem(path: Path) -> str | None:
    """What the gguf reader trips on in `path` (None: it reads the file, or is not installed)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        GGUFReader(path)
    except Exception as err:  # whatever the reader trips on, the file is at fault
        return f"{err.__class__.__name__}: {err}"
    return None


def load_model(
    spec: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str = "sdpa",
    say: Callable[[str], None] | None = None,
):
    """Load a supported causal LM and its tokenizer.

    `spec` is a hub id (needs a reachable hub), a local model directory, or a `.gguf` file
    (converted once into the cache, see the module doc). `dtype` defaults to bfloat16 on a GPU
    and float32 on the CPU. The tokenizer pads on the left (for batched generation) and has a
    pad token. Returns `(model, tokenizer)`; `rlkv.Layout.of(model)` describes its heads.
    transformers' progress bars stay off; `say(line)`, if given, hears one line before a GGUF
    conversion, the one step that takes long (a minute or more on a CPU).
    """
    source, extra = model_source(spec)
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    gguf = Path(spec).expanduser() if extra else None
    converted = gguf_cache_dir(gguf, dtype) if gguf else None
    if converted is not None and (converted / "config.json").is_file():
        source, extra = str(converted), {}  # converted by an earlier load
    elif gguf is not None and say is not None:
        kept = f"kept in {converted}" if converted is not None else "RLKV_CACHE=off: every load converts it"
        say(f"converting {gguf.name} to {str(dtype).removeprefix('torch.')}, once (a minute or more; {kept})")
    with _quiet_progress():
        with _gguf_read_errors(gguf if extra else None):
            model, tokenizer = _from_pretrained(spec, source, extra, dtype, attn_implementation)
        if gguf:  # name it after its file, wherever the weights came from
            model.config._name_or_path = str(gguf)
        if extra:  # de-quantized from the .gguf: let save_pretrained work, and keep the conversion
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            if converted is not None:
                _store_converted(model, tokenizer, converted)
    model = model.to(device)
    model.eval()
    configure_tokenizer(tokenizer, model)
    return model, tokenizer


@contextmanager
def _quiet_progress():
    """transformers' progress bars off inside the block: its loading and shard-writing bars follow its own
    switch; the GGUF converter's comes straight from tqdm, so a silent tqdm stands in for it meanwhile."""
    from transformers import modeling_gguf_pytorch_utils as gguf_conversion
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    bar = getattr(gguf_conversion, "tqdm", None)
    logging.disable_progress_bar()
    if bar is not None:
        setattr(gguf_conversion, "tqdm", functools.partial(bar, disable=True))  # noqa: B010 (not its export)
    try:
        yield
    finally:
        if bar is not None:
            setattr(gguf_conversion, "tqdm", bar)  # noqa: B010
        if was_on:
            logging.enable_progress_bar()


def _from_pretrained(spec, source: str, extra: dict, dtype: torch.dtype, attn_implementation: str) -> tuple[Any, Any]:
    """(model, tokenizer) from a hub id or directory, or a .gguf (`extra` names the file); the config first,
    so an unsupported architecture is refused before any weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, **extra)
    except OSError as err:
        raise OSError(
            f"could not load a model config from {spec!r}: a hub id needs a reachable Hugging Face hub; "
            f"otherwise pass a local directory or .gguf file ({err.__class__.__name__})"
        ) from None
    check_supported(config.get_text_config(decoder=True))
    unpack = _dequantized() if "gguf_file" in extra else {}
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation, **extra, **unpack
    )
    return model, AutoTokenizer.from_pretrained(source, **extra)


def _dequantized() -> dict:
    """from_pretrained's option that unpacks a GGUF into dense weights: transformers >= 5.25 keeps them in
    their blocks where it has a kernel (and warns that anything but float32 is slow even where it has none);
    rlkv's attention and the cached conversion need plain weights. Older versions always unpack."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def cache_root() -> Path | None:
    """Where rlkv keeps converted models: $RLKV_CACHE, else ~/.cache/rlkv; None when RLKV_CACHE=off."""
    value = os.environ.get("RLKV_CACHE", "").strip()
    if value.lower() in ("off", "0", "none"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "rlkv"


def gguf_cache_dir(path: Path, dtype: torch.dtype) -> Path | None:
    """The directory holding `path` converted at `dtype` (None: the cache is off). The key is the file's
    resolved path, size and modification time, so a changed or replaced file is converted again."""
    import transformers

    root = cache_root()
    if root is None:
        return None
    stat = path.resolve().stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|{transformers.__version__}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return root / "gguf" / f"{path.stem}-{str(dtype).removeprefix('torch.')}-{key}"


def _store_converted(model, tokenizer, target: Path) -> None:
    """save_pretrained into a temporary directory, then one rename: a reader never sees half a model.
    A cache that cannot be written costs only the next load's time, so it warns instead of failing."""
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError as err:
        if not (target / "config.json").is_file():  # not just another process that finished first
            warnings.warn(
                f"could not cache the converted GGUF in {target} ({err}); set RLKV_CACHE to a "
                "writable directory, or RLKV_CACHE=off",
                stacklevel=3,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def configure_tokenizer(tokenizer, model=None):
    """Left padding and a pad token, as batched generation needs."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the model's generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no EOS token id (generation_config.eos_token_id) to stop generation on")
    return ids


def generated_end(tokens: torch.Tensor, eos: torch.Tensor, flagged_at: int | None) -> tuple[int, str]:
    """(tokens generated, finish reason) of one row of `generate`'s output: the first EOS, unless the
    repetition stop came first (`flagged_at` tokens). What follows either is padding, and the pad token
    may itself be an EOS id (Qwen's <|endoftext|>), so a stopped row must not be read as ending there."""
    hits = torch.nonzero(torch.isin(tokens, eos)).flatten()
    if len(hits) and (flagged_at is None or int(hits[0]) < flagged_at):
        return int(hits[0]) + 1, "eos"
    if flagged_at is not None:
        return flagged_at, "repetition"
    return len(tokens), "length"
