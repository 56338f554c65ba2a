"""Per-head scores and the keep-mask derived from them.

A `HeadScores` is a (layers x kv_heads) float matrix: higher means "this head needs its full
KV cache". RLKV's learned gates, DuoAttention's full-attention weights and random baselines
are all HeadScores, so every method and both runtimes consume the same object. `keep_mask`
turns scores into the one decision the runtimes act on: which KV heads keep a full cache.

Two rules pick the heads at a sparsity (`keep_mask(..., rule=)`):
- "rank": exactly round((1 - s) * heads) of the highest scores, ties to the lower (layer, head) index;
- "authors" (RLKV's eval/ and SGLang fork, DuoAttention's `sparsify_attention_heads`): scores
  clipped to [0, 1], plus uniform noise in [0, 1e-6) from numpy's RandomState(seed) (the authors
  seed 42) to break ties, and the heads at or above np.quantile(scores, s) keep a full cache
  (heads - ceil(s * (heads - 1)) of them for distinct scores, which can differ by one from "rank").
A HeadScores without a rule given uses the one in its provenance ("keep_rule"; identify's paper
recipe and the shipped published patterns record "authors"), else "rank".

Files (`HeadScores.load`):
- JSON (native): {"scores": [[...]], "model": ..., "layout": {...}, "method": ..., "provenance": {...}}
- TSV (as published with RLKV `adapter_weights.tsv` and DuoAttention `full_attention_heads.tsv`):
  one row per layer, one tab-separated value per KV head.
- the authors' adapter_weight.pt gates, a directory in the authors' layout, or a name from
  `rlkv heads list`: heads rlkv identified and ships ("rlkv:qwen2.5-coder-0.5b-instruct") or a
  published pattern ("duo:meta-llama-3.1-8b-instruct"), see `rlkv.patterns`.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rlkv import patterns
from rlkv.excerpt import excerpt
from rlkv.models import Layout
from rlkv.sources import TORCH_FILES, heads_file, is_torch_file

KEEP_RULES = ("rank", "authors")


def command_line() -> str:
    """This process's command line, for the provenance of head scores it writes."""
    return " ".join(shlex.quote(a) for a in sys.argv)


@dataclass
class HeadScores:
    scores: torch.Tensor
    model: str | None = None
    layout: dict | None = None
    method: str = "unknown"
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        scores = _as_matrix(self.scores)
        if scores.ndim != 2 or 0 in scores.shape:
            raise ValueError(
                f"head scores must be a non-empty 2-D (layers x kv_heads) matrix, got shape {tuple(scores.shape)}"
            )
        if not torch.isfinite(scores).all():
            bad = torch.nonzero(~torch.isfinite(scores))[0].tolist()
            value = scores[bad[0], bad[1]].item()
            raise ValueError(f"head scores must be finite numbers, found {value} at layer {bad[0]}, head {bad[1]}")
        self.scores = scores

    @property
    def shape(self) -> tuple[int, int]:
        layers, kv_heads = self.scores.shape
        return layers, kv_heads

    @property
    def num_heads(self) -> int:
        return self.scores.numel()

    # ------------------------------------------------------------------ decisions
    def keep_mask(
        self, sparsity: float | None = None, *, threshold: float | None = None, rule: str | None = None, seed: int = 42
    ) -> torch.Tensor:
        """Bool (layers x kv_heads): True where the head keeps a full KV cache.

        With `sparsity` s in [0, 1], the highest-scoring heads over the whole model by `rule`
        (module docstring; None: the provenance's "keep_rule", else "rank"); `seed` seeds the
        authors' tie noise. With `threshold`, the heads with score >= threshold (under "authors":
        the clipped, noised score).
        """
        if (sparsity is None) == (threshold is None):
            raise ValueError("keep_mask needs exactly one of sparsity= or threshold=")
        rule = self.keep_rule if rule is None else rule
        if rule not in KEEP_RULES:
            raise ValueError(f"unknown keep rule {rule!r}: expected one of {', '.join(KEEP_RULES)}")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
                raise ValueError(
                    f"threshold must be a number (heads with score >= it keep a full cache), got {threshold!r}"
                )
            scores = self._noised(seed) if rule == "authors" else self.scores.double().numpy()
            return torch.from_numpy(scores >= float(threshold))
        assert sparsity is not None  # exactly one of the two, checked above
        n_keep = num_kept(sparsity, self.num_heads)
        if rule == "authors":
            return self._authors_keep(float(sparsity), seed)
        flat = self.scores.flatten()
        order = torch.argsort(-flat, stable=True)  # stable: equal scores keep index order
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[:n_keep]] = True
        return keep.view(self.shape)

    @property
    def keep_rule(self) -> str:
        """The rule `keep_mask` uses when none is given: the provenance's, else "rank"."""
        return self.provenance.get("keep_rule", "rank")

    def _noised(self, seed: int) -> np.ndarray:
        """The authors' scores: clipped to [0, 1], in float64, plus RandomState(seed) noise in [0, 1e-6)."""
        scores = np.clip(self.scores.double().numpy(), 0, 1)
        return scores + np.random.RandomState(seed).uniform(0, 1e-6, scores.shape)

    def _authors_keep(self, sparsity: float, seed: int) -> torch.Tensor:
        """RLKV's eval/ and SGLang rule: heads at or above the sparsity quantile of the noised scores."""
        scores = self._noised(seed)
        if sparsity >= 1:
            return torch.zeros(self.shape, dtype=torch.bool)
        if sparsity <= 0:
            return torch.ones(self.shape, dtype=torch.bool)
        return torch.from_numpy(scores >= np.quantile(scores, sparsity))

    def check_layout(self, layout: Layout) -> None:
        """Raise if these scores do not fit a model with `layout`."""
        if self.shape != layout.shape:
            src = f" (made for {self.model})" if self.model else ""
            raise ValueError(
                f"head scores are {self.shape[0]}x{self.shape[1]} (layers x kv_heads){src} but the model "
                f"{layout.name or layout.arch} has {layout.num_layers}x{layout.num_kv_heads}"
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def uniform(cls, layout: Layout, value: float = 1.0, method: str = "uniform") -> HeadScores:
        return cls(torch.full(layout.shape, float(value)), model=layout.name, layout=layout.to_dict(), method=method)

    @classmethod
    def random(cls, layout: Layout, seed: int = 0) -> HeadScores:
        """Random scores: the floor any learned head choice must clear."""
        gen = torch.Generator().manual_seed(seed)
        return cls(
            torch.rand(layout.shape, generator=gen),
            model=layout.name,
            layout=layout.to_dict(),
            method="random",
            provenance={"seed": seed},
        )

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {
            "scores": self.scores.tolist(),
            "model": self.model,
            "layout": self.layout,
            "method": self.method,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        """Write JSON (or TSV if the path ends in .tsv)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".tsv":
            text = "\n".join("\t".join(repr(float(v)) for v in row) for row in self.scores.tolist()) + "\n"
        else:
            text = json.dumps(self.to_dict(), indent=1)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, method: str | None = None) -> HeadScores:
        """Read a name from `rlkv heads list`, a directory in the authors' layout, a .pt of gates, JSON or TSV."""
        if patterns.is_name(path):
            file, name = patterns.resolve(str(path)), str(path).lower()
            scores = cls.load(file, method=method or name.split(":")[0])
            if name in patterns.shipped():  # rlkv's own: its file's provenance says how it was made
                scores.provenance = {"shipped": name, **scores.provenance}
            else:
                scores.provenance = {"published": name, "keep_rule": "authors", **scores.provenance}
            return scores
        path = heads_file(path)
        raw = path.read_bytes()
        if path.suffix in TORCH_FILES or is_torch_file(raw):
            gates, model = patterns.read_adapter_pt(path)
            return cls(gates, model=model, method=method or "rlkv", provenance={"source": str(path)})
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise ValueError(
                f"{path}: not a text file (expected head scores as .json or .tsv, or gates as .pt)"
            ) from None
        if path.suffix == ".json" or text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
                scores = data["scores"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{path}: not a head scores JSON (expected an object with a 'scores' matrix): {err}"
                ) from None
            return cls(
                _matrix(scores, path),
                model=data.get("model"),
                layout=data.get("layout"),
                method=method or data.get("method", "unknown"),
                provenance=data.get("provenance", {}),
            )
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append([float(v) for v in line.replace(",", "\t").split()])
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: expected tab-separated numbers (one per KV head), got {excerpt(line, 60)!r}"
                ) from None
        guess = "duo" if "full_attention" in path.name else "rlkv" if "adapter" in path.name else "unknown"
        return cls(_matrix(rows, path), method=method or guess, provenance={"source": str(path)})

    @classmethod
    def published(cls, name: str) -> HeadScores:
        """Heads shipped with rlkv, by name (`rlkv.patterns.names()`, `rlkv heads list`)."""
        if not patterns.is_name(name):
            raise ValueError(
                f"{name!r} is not the name of shipped heads (expected rlkv:<model> or duo:<model>; "
                "see `rlkv heads list`)"
            )
        return cls.load(name)

    # ------------------------------------------------------------------ pictures
    def plot(self, path: str | Path, sparsity: float | None = None, title: str | None = None) -> Path:
        """Heat map of the scores, and of the kept heads at `sparsity` if given; writes a PNG titled
        with the model's name (the last part of its path or hub id) unless `title` is given."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        panels = 1 if sparsity is None else 2
        L, H = self.shape
        width = max(3.0, 0.45 * H + 1.8)
        fig, axes = plt.subplots(1, panels, figsize=(width * panels, max(3.4, 0.22 * L + 1.6)), squeeze=False)
        im = axes[0, 0].imshow(self.scores.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        axes[0, 0].set_title(f"{self.method} scores")
        fig.colorbar(im, ax=axes[0, 0], fraction=0.08).set_label("score (higher: kept first)")
        if sparsity is not None:
            keep = self.keep_mask(sparsity)
            colors = ListedColormap(["#d9d9d9", "#1f4e79"])  # compressed, kept
            axes[0, 1].imshow(keep.numpy(), aspect="auto", cmap=colors, vmin=0, vmax=1, interpolation="nearest")
            axes[0, 1].set_title(f"kept at sparsity {sparsity:g}: {int(keep.sum())}/{self.num_heads}")
            legend = [
                Patch(color=colors(1), label="kept: full cache"),
                Patch(color=colors(0), label="compressed: sink + recent"),
            ]
            axes[0, 1].legend(
                handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7, frameon=False
            )
        for ax in axes[0]:
            ax.set_xlabel("KV head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(H))
        fig.suptitle(title or (Path(self.model).name if self.model else "head scores"), fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def summary(self) -> str:
        s = self.scores
        return (
            f"{self.method} head scores for {self.model or 'unknown model'}: {self.shape[0]} layers x "
            f"{self.shape[1]} kv heads; min {s.min():.4f} mean {s.mean():.4f} max {s.max():.4f}; "
            f"{int((s < 0.5).sum())} of {s.numel()} below 0.5; {int((s == s.max()).sum())} at the maximum "
            f"(keep rule {self.keep_rule}: ties {'by index' if self.keep_rule == 'rank' else 'by seeded noise'})"
        )


def num_kept(sparsity: float, num_heads: int) -> int:
    """Heads that keep a full cache at `sparsity`: round((1 - s) * num_heads), halves rounded up."""
    number = isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool)
    if not number or math.isnan(sparsity) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1] (fraction of KV heads compressed), got {sparsity!r}")
    return int(math.floor((1.0 - sparsity) * num_heads + 0.5))


def _as_matrix(scores) -> torch.Tensor:
    """`scores` as a float32 CPU matrix, or a one-line error saying what was wrong."""
    if isinstance(scores, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in scores):
        widths = sorted({len(r) for r in scores})
        if len(widths) > 1:
            raise ValueError(
                f"head scores rows have different lengths {widths}: expected one value per KV head in every layer"
            )
    try:
        return torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            "head scores must be a 2-D (layers x kv_heads) matrix of numbers (tensor, array or nested "
            f"lists), got {type(scores).__name__}"
        ) from None


def _matrix(rows, path) -> torch.Tensor:
    if not rows or not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise ValueError(f"{path}: expected a matrix with one row per layer")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(
            f"{path}: rows have different lengths {sorted(widths)}: expected one value per KV head in every layer"
        )
    return torch.tensor(rows, dtype=torch.float32)
