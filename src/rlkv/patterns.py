"""Head scores by name: the ones rlkv ships, the published patterns, the authors' directories and .pt gates.

- Names (`rlkv heads list`): `shipped()` maps "<method>:<model>" to heads identified by rlkv
  itself and shipped in rlkv/data/heads (one JSON each, the command and settings that made them
  in its provenance); `published()` maps "duo:<model>" to the DuoAttention patterns shipped in
  rlkv/data/duo (MIT; see its SOURCES.md). The RLKV authors' own gates are not shipped (their
  repository has no licence), so other "rlkv:<model>" names say where to get them.
- Directories: `pattern_file(dir)` finds the pattern in the authors' layouts, RLKV's
  head_dist/rlkv/<model>/<run>/adapter_weights.tsv and DuoAttention's
  attn_patterns/<model>/<run>/full_attention_heads.tsv, given the run or the model directory.
- .pt gates: `read_adapter_pt(path)` reads what the authors' AReaL fork saves
  (areal/mixed_attn/utils.py `save_adapter_weight`): {"adapter_weight_dict":
  {"model.layers.<i>.self_attn.adapter.weight": tensor [kv_heads]}, "model_name": str}.

Nothing here imports torch until a .pt file is read, so a command can check its --heads first.
"""

from __future__ import annotations

import re
from pathlib import Path

from rlkv.excerpt import excerpt

DATA = Path(__file__).parent / "data"
SHIPPED = DATA / "heads"  # <model>.<method>.json
PATTERN_FILES = ("heads.json", "adapter_weights.tsv", "full_attention_heads.tsv", "adapter_weight.pt")
RLKV_REPO = "https://github.com/Kurt232/RLKV"


def shipped() -> dict[str, Path]:
    """Names of the heads rlkv identified and ships ("rlkv:qwen2.5-coder-0.5b-instruct") -> their JSON files."""
    names = {}
    for path in sorted(SHIPPED.glob("*.json")):
        model, method = path.stem.rsplit(".", 1)
        names[f"{method}:{model}"] = path
    return names


def published() -> dict[str, Path]:
    """Names of the published DuoAttention patterns shipped with rlkv -> their files."""
    return {
        f"duo:{d.name.lower()}": d / "full_attention_heads.tsv" for d in sorted((DATA / "duo").iterdir()) if d.is_dir()
    }


def names() -> dict[str, Path]:
    """Every name `HeadScores.load` takes -> its file: rlkv's own heads first, then the published patterns."""
    return {**shipped(), **published()}


def is_name(text) -> bool:
    """Whether `text` (a str or path) is a head-score name ("duo:..." / "rlkv:...") rather than a file."""
    text = str(text)
    return text.split(":", 1)[0] in ("duo", "rlkv") and ":" in text and not Path(text).exists()


def resolve(name: str) -> Path:
    """The shipped file of `name`, or a one-line error naming the known ones."""
    table = names()
    if name.lower() in table:
        return table[name.lower()]
    if name.startswith("rlkv:"):
        raise FileNotFoundError(
            f"{name}: the RLKV authors' gates are not shipped with rlkv ({RLKV_REPO} has no "
            "licence); clone it and load head_dist/rlkv/<model> by path"
        )
    raise FileNotFoundError(
        f"unknown head pattern {name!r}: expected one of {', '.join(table)} (see `rlkv heads list`)"
    )


def locate(source) -> Path:
    """The file behind a published name, a pattern directory or a path (which may not exist)."""
    if is_name(source):
        return resolve(str(source))
    path = Path(source)
    return pattern_file(path) if path.is_dir() else path


def pattern_file(directory: Path) -> Path:
    """The pattern file of a run directory, or of a model directory holding exactly one run."""
    for depth in ("", "*/", "*/*/"):
        runs = sorted({p.parent for name in PATTERN_FILES for p in directory.glob(depth + name)})
        if len(runs) == 1:
            return next(runs[0] / name for name in PATTERN_FILES if (runs[0] / name).is_file())
        if runs:
            listed = ", ".join(str(r.relative_to(directory)) for r in runs[:6])
            raise ValueError(
                f"{directory} holds {len(runs)} head patterns ({listed}{', ...' if len(runs) > 6 else ''}): "
                "give the directory of one"
            )
    raise FileNotFoundError(
        f"{directory}: no head pattern found (expected one of {', '.join(PATTERN_FILES)} in it "
        "or in one run directory below it)"
    )


def read_adapter_pt(path: Path):
    """(gates [layers, kv_heads] float32 tensor, model name) of the authors' adapter_weight.pt, or of a 2-D
    tensor file."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unreadable file: say which and why)
        raise ValueError(f"{path}: not a torch file of gates ({type(err).__name__}: {excerpt(str(err))})") from None
    if isinstance(data, torch.Tensor):
        return data.float(), None
    if not isinstance(data, dict) or not isinstance(data.get("adapter_weight_dict"), dict):
        raise ValueError(
            f"{path}: expected the authors' adapter_weight.pt (a dict with 'adapter_weight_dict') "
            "or a 2-D tensor of gates"
        )
    layers = {}
    for key, value in data["adapter_weight_dict"].items():
        match = re.search(r"layers\.(\d+)\.", key)
        if match is None or not isinstance(value, torch.Tensor) or value.ndim != 1:
            raise ValueError(
                f"{path}: entry {key!r} is not one layer's gate vector (model.layers.<i>....adapter.weight)"
            )
        layers[int(match.group(1))] = value.float()
    if sorted(layers) != list(range(len(layers))) or not layers:
        raise ValueError(f"{path}: gates for layers {sorted(layers)}: expected layers 0..L-1, one vector each")
    if len({v.numel() for v in layers.values()}) != 1:
        raise ValueError(f"{path}: layers have different numbers of KV-head gates")
    return torch.stack([layers[i] for i in range(len(layers))]), data.get("model_name")
