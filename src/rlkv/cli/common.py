"""What every `rlkv` command shares: the consoles, the one-line error exit, option parsing and checks.

Errors the user can fix (bad paths, shapes, values) print one line on stderr and exit with status 2.
Paths are checked first (`check_model`, `check_heads`: no torch, no transformers), so a wrong one
is reported in well under a second instead of after the imports and the model load.
"""

from __future__ import annotations

import dataclasses
import math
import re

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
errors = Console(stderr=True)

USER_ERRORS = (ValueError, FileNotFoundError, OSError, KeyError)

MODEL_HELP = "hub id, local model directory or .gguf file"
HEADS_HELP = "head scores: a name from `rlkv heads list`, a .json/.tsv/.pt file or a pattern directory"
SPARSITY_HELP = "fraction of KV heads that keep only sink + recent tokens"
BUDGET_HELP = "tokens kept per KV head by h2o / snapkv / rkv"
DATA_DIR_HELP = "task data directory (default $RLKV_DATA_DIR or ../shared/data)"
KV_DTYPE_HELP = (
    "how K/V are stored: bf16 (the model's dtype), fp8 (e4m3 at per-KV-head scales, keys centred: half the bytes), "
    "fp8-kept (head splits: kept heads fp8, the compressed heads' rings bf16)"
)
PREFILL_HELP = (
    "head splits: full (every head attends over the whole prompt, then is cut: the authors') "
    "or compressed (the compressed heads' rule inside the prompt too)"
)


def fail(err: Exception) -> None:
    """Print `err` as one red line on stderr and exit with status 2."""
    errors.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


def say(line: str) -> None:
    """One line of progress on stdout, as written (no wrapping, no highlighting)."""
    console.print(line, soft_wrap=True, highlight=False)


def note(line: str) -> None:
    """One line of progress on stderr (stdout keeps only the command's results)."""
    errors.print(escape(line), soft_wrap=True, highlight=False)


def check_model(spec: str) -> None:
    """Refuse a model path that cannot load (missing, a directory without config.json, not a GGUF) at once."""
    from rlkv.sources import model_source

    model_source(spec)


def check_heads(source) -> None:
    """Refuse head scores that cannot load (an unknown name, a missing file, a torch file that is none) at once."""
    from rlkv.sources import heads_file

    heads_file(source)


def load_model(spec, **options):
    """`rlkv.load_model(spec, **options)`, saying on stderr when a GGUF is being converted (the slow first load)."""
    import rlkv

    return rlkv.load_model(spec, say=note, **options)


def warn(line: str) -> None:
    """One yellow warning line on stderr."""
    errors.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True, highlight=False)


def finite(value: float | None) -> float | None:
    """A float option must be a finite number: a range with both ends refuses nan and inf, one with a minimum
    only inf."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"expected a finite number, got {value}")
    return value


def build_config(cls, **options):
    """`cls(**options)` built from CLI options; an error that starts with a field's name names its flag
    instead (IdentifyConfig.band -> --band, keep_rule -> --keep-rule)."""
    try:
        return cls(**options)
    except ValueError as err:
        names = "|".join(f.name for f in dataclasses.fields(cls))

        def flag(match: re.Match) -> str:
            return "--" + match.group(1).replace("_", "-")

        raise ValueError(re.sub(rf"^(?:{cls.__name__}\.)?({names})\b", flag, str(err))) from None


def config_from_options(cls, options: dict, **parsed):
    """`build_config(cls, ...)` from a command's options (its `locals()`): each option named as a field of `cls`
    sets that field; `parsed` holds the fields whose option text is parsed first, and wins."""
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {name: value for name, value in options.items() if name in fields}
    return build_config(cls, **{**given, **parsed})


def check_budget(methods: list[str], budget: int | None, match_bytes: bool | None = None) -> None:
    """Token-dropping methods need a token budget: refused before the (slow) model load, in flags."""
    from rlkv.methods import TOKEN_DROPPING

    dropping = [m for m in methods if m in TOKEN_DROPPING]
    if dropping and budget is None and not match_bytes:
        alternative = " or --match-bytes (the bytes the head-split method held)" if match_bytes is not None else ""
        raise ValueError(f"--method {dropping[0]} needs --budget N (tokens kept per layer and KV head){alternative}")


def parse_floats(text: str, what: str) -> list[float]:
    """A comma-separated list of finite numbers (--sparsity 0,0.5): `what` names the flag in the error."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be comma-separated finite numbers, got {text!r}")
    return values


def parse_names(text: str) -> list[str]:
    """A comma-separated list of names (--task a,b), blanks dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_kv_budget(text: str | None, what: str) -> str | float | None:
    """A KV budget option: "0.4" is a share of free GPU memory, "8GiB" or "8000000000" a size."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return text  # a size string: rlkv.engine checks it
    if not math.isfinite(value) or not (0 < value <= 1 or value.is_integer() and value > 1):
        raise ValueError(
            f"{what} expects a share of free GPU memory in (0, 1], a whole number of bytes or a size "
            f"such as 20GiB, got {text!r}"
        )
    return value if value <= 1 else int(value)


def parse_heads(values: list[str] | None) -> str | dict[str, str] | None:
    """--heads: one file for every head-ranked method, or METHOD=FILE entries."""
    if not values:
        return None
    pairs = [v.split("=", 1) for v in values if "=" in v]
    if not pairs:
        if len(values) > 1:
            raise ValueError(f"--heads: give one file, or METHOD=FILE for each method; got {values}")
        return values[0]
    if len(pairs) != len(values):
        raise ValueError(f"--heads: do not mix a plain file with METHOD=FILE entries; got {values}")
    return dict(pairs)
