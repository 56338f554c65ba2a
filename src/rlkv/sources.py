"""Where a model and head scores come from, checked before anything heavy is imported.

A command given a wrong path should say so at once, not after importing torch and transformers
and loading a model (seconds to tens of seconds). `model_source` and `heads_file` decide from
the path alone, and the first bytes of a file, whether it can be what it claims; this module
imports neither torch nor transformers, and `load_model` and `HeadScores.load` use the same
checks, so a message is worded once.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlkv import patterns

GGUF_FIX = "expected a complete GGUF model file (a truncated download? fetch it again)"
TORCH_FILES = (".pt", ".pth", ".bin")


def model_source(spec: str | os.PathLike) -> tuple[str, dict]:
    """(what transformers loads: a hub id or a directory, extra from_pretrained kwargs: the GGUF file's name)
    for a hub id, a model directory or a .gguf file; a missing or malformed path raises, naming it."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path} (expected an existing .gguf file)")
        _check_gguf(path)
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a directory without config.json: expected a model saved with save_pretrained"
            )
        return str(path), {}
    if path.exists():
        raise ValueError(f"{path} is a file but not a .gguf: expected a hub id, a model directory or a .gguf file")
    if str(spec).count("/") > 1 or str(spec).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path not found: {spec} (expected a hub id, a model directory or a .gguf file)")
    return str(spec), {}


def _check_gguf(path: Path) -> None:
    """Refuse a .gguf that is empty or does not start with the GGUF magic, naming it, before transformers reads it."""
    with path.open("rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        what = "is empty" if not head else f"does not start with the GGUF magic bytes (it starts with {head!r})"
        raise ValueError(f"{path} {what}: {GGUF_FIX}")


def heads_file(source) -> Path:
    """The file behind head scores given as a name from `rlkv heads list`, a pattern directory or a path;
    a missing file, or a torch file that is neither a zip nor a pickle, raises naming it."""
    path = patterns.locate(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"head scores file not found: {path} (expected a .json, .tsv or .pt file, a pattern "
            "directory, or a name from `rlkv heads list`)"
        )
    if path.suffix in TORCH_FILES:
        with path.open("rb") as f:
            head = f.read(2)
        if not is_torch_file(head):
            raise ValueError(
                f"{path}: not a torch file of gates (a torch file is a zip or a pickle; this one starts with {head!r})"
            )
    return path


def is_torch_file(head: bytes) -> bool:
    """Whether a file starting with `head` can be a torch file: torch.save writes a zip, older torch a pickle."""
    return head[:2] == b"PK" or head[:1] == b"\x80"
