"""Whether an identification run is working, read from its log.jsonl: a summary and a figure.

    rlkv report runs/id            # writes runs/id/training.md and runs/id/training.png

What tells whether RLKV training works (the paper's recipe depends on it): the batch's mean reward
against tau, since the sparsity penalty acts only above it; how many rollouts hit the length cap;
and whether the gates spread apart (a useful ranking) or only drift together.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_log(run_dir: str | Path) -> list[dict]:
    """The step records of `run_dir`/log.jsonl, in order."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected an `rlkv identify` run directory")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no steps yet")
    return records


def summary(records: list[dict]) -> str:
    """Markdown: the share of steps where the penalty acted, rewards, lengths, the gates at the end."""
    n = len(records)
    acted = sum(r["penalty_weight"] > 0 for r in records)
    rewards = [r["mean_reward"] for r in records]
    last = records[-1]
    lines = [
        f"# Identification: {n} steps",
        "",
        f"- penalty acted in **{acted} of {n} steps ({acted / n:.0%})**"
        + (f" (tau {last['tau']:g})" if last.get("tau") is not None else ""),
        f"- mean reward {sum(rewards) / n:.3f} (first 10 steps {_mean(rewards[:10]):.3f}, "
        f"last 10 {_mean(rewards[-10:]):.3f}; min {min(rewards):.3f}, max {max(rewards):.3f})",
        f"- mean response {_mean([r['mean_response_tokens'] for r in records]):.0f} tokens",
    ]
    if "capped_rollouts" in last:
        capped = sum(r["capped_rollouts"] for r in records)
        longest = max(r["max_response_tokens"] for r in records)
        lines.append(f"- {capped} rollouts hit the length cap; the longest was {longest:,} tokens")
    lines.append(
        f"- gates at step {last['step']}: mean {last['alpha_mean']:.3f}"
        + (f", std {last['alpha_std']:.3f}" if "alpha_std" in last else "")
        + f", min {last['alpha_min']:.3f}, max {last['alpha_max']:.3f}, below 0.5: {last['frac_alpha_below_half']:.0%}"
    )
    times = [r["rollout_s"] + r["update_s"] for r in records]
    lines.append(f"- {_mean(times):.1f} s per step ({sum(times) / 60:.0f} min in all)")
    peaks = [r["peak_gib"] for r in records if r.get("peak_gib") is not None]
    if peaks:
        lines.append(f"- peak GPU memory {max(peaks):.1f} GiB")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str | Path) -> Path:
    """Four panels over steps: reward against tau (penalty steps marked), the gates, response lengths, time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ((reward, gates), (lengths, times)) = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    reward.plot(steps, [r["mean_reward"] for r in records], label="batch mean reward")
    acted = [r for r in records if r["penalty_weight"] > 0]
    reward.scatter([r["step"] for r in acted], [r["mean_reward"] for r in acted], s=10, c="C3", label="penalty acted")
    if records[-1].get("tau") is not None:
        reward.axhline(records[-1]["tau"], ls="--", c="gray", label="tau")
    reward.set_ylabel("reward")
    reward.legend(fontsize=8)
    mean = [r["alpha_mean"] for r in records]
    gates.plot(steps, mean, label="mean")
    gates.fill_between(
        steps, [r["alpha_min"] for r in records], [r["alpha_max"] for r in records], alpha=0.2, label="min-max"
    )
    if "alpha_std" in records[-1]:
        std = [r.get("alpha_std", 0.0) for r in records]
        gates.plot(steps, [m - s for m, s in zip(mean, std)], c="C0", ls=":", label="mean - std")
    gates.set_ylabel("alpha")
    gates.legend(fontsize=8)
    lengths.plot(steps, [r["mean_response_tokens"] for r in records], label="mean")
    if "max_response_tokens" in records[-1]:
        lengths.plot(steps, [r.get("max_response_tokens") for r in records], label="longest")
    lengths.set_ylabel("response tokens")
    lengths.set_xlabel("step")
    lengths.legend(fontsize=8)
    times.plot(steps, [r["rollout_s"] for r in records], label="rollouts")
    times.plot(steps, [r["update_s"] for r in records], label="update")
    times.set_ylabel("seconds")
    times.set_xlabel("step")
    times.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path) -> Path:
    """`run_dir`/training.md and training.png from its log; returns the markdown's path."""
    run_dir = Path(run_dir)
    records = read_log(run_dir)
    plot(records, run_dir / "training.png")
    path = run_dir / "training.md"
    path.write_text(summary(records) + "\n![training](training.png)\n")
    return path


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
