"""The whole of `rlkv identify`, callable from Python: held-out split, curriculum, training, sanity check.

    run = identify_pipeline("Qwen/Qwen2.5-1.5B-Instruct", "math_train", IdentifyConfig(), "runs/id", say=print)
    run.heads, run.check.table()

1. The task's problems (shuffled by the config's seed) are split: the last `check_limit` are held
   out for the sanity check, the first `limit` of the rest are the training candidates.
2. Under torchrun (WORLD_SIZE > 1) each process joins the process group and loads the model
   onto its own GPU; rank 0 scores the curriculum first, then the others read its cache.
3. The gates are trained on the problems the curriculum keeps (`rlkv.identify.grpo`).
4. Rank 0 checks the learned heads against full and random heads on the held-out problems.
Progress lines go to `say`, advice to `warn` (by default `warnings.warn`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

import rlkv.tasks as task_registry
from rlkv.eval import EvalResults
from rlkv.heads import HeadScores
from rlkv.identify.check import sanity_check
from rlkv.identify.curriculum import keep_problems, pass_rates
from rlkv.identify.grpo import identify, rewarded, rollout_engine
from rlkv.identify.recipe import IdentifyConfig
from rlkv.models import Layout, load_model

T = TypeVar("T")


@dataclass
class IdentifyRun:
    """What an identification run made: its heads, the curriculum's problems, the sanity check (rank 0)."""

    heads: HeadScores
    problems: list  # the training problems the curriculum kept
    candidates: int  # of this many
    check: EvalResults | None  # None: skipped (check_limit 0) or not rank 0
    rank: int


def identify_pipeline(
    model,
    task: str,
    config: IdentifyConfig | None = None,
    out: str | os.PathLike = "identify",
    *,
    tokenizer=None,
    data_dir: str | None = None,
    limit: int | None = None,
    check_limit: int = 64,
    check_sparsities: tuple[float, ...] = (0.5, 0.8),
    check_max_new_tokens: int | None = None,
    say: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> IdentifyRun:
    """Identify the heads of `model` (a hub id, local directory or .gguf, loaded here; or a loaded model with
    its `tokenizer`) on `task`; writes `out`/heads.json, and the sanity check's run under `out`/check."""
    say = say or (lambda line: None)
    warn = warn or (lambda line: warnings.warn(line, stacklevel=3))
    out = Path(out)
    config = config or IdentifyConfig()
    training = rewarded(task_registry.get(task), config.answer_rule)  # fails before the model loads if it can't apply
    examples, heldout = split_heldout(training.load(data_dir=data_dir, seed=config.seed), check_limit, limit)
    rank, device = join_torchrun()
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_model(model, device=device, say=say)
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer (tokenizer=...)")
    config = config.for_model(Layout.of(model))
    say(f"tau {config.tau:g}, beta {config.beta:g} ({Layout.of(model).arch}); rewards by the {config.answer_rule} rule")
    problems = rank0_first(lambda: _curriculum(model, tokenizer, training, examples, config, out))
    say(f"curriculum: {len(problems)}/{len(examples)} problems {_kept(config)}{_per_task(problems, examples)}")
    heads = identify(model, tokenizer, training, problems, config, out)
    run = IdentifyRun(heads, problems, len(examples), None, rank)
    if rank != 0:
        return run
    say(heads.summary())
    say(f"wrote {out / 'heads.json'}")
    acted = heads.provenance["penalty_steps"]
    if acted < config.steps / 2:
        warn(
            f"the sparsity penalty acted in {acted} of {config.steps} steps (the batch reward stayed at or below "
            f"--tau {config.tau:g} in the others), so the gates moved mostly under the policy gradient; easier "
            "problems (--problems reliable, an easier --task) or a lower --tau let it act"
        )
    if check_limit:
        run.check = sanity_check(
            model,
            tokenizer,
            training,
            heldout,
            out / "heads.json",
            out,
            sparsities=tuple(check_sparsities),
            max_new_tokens=check_max_new_tokens,
            batch_size=config.rollout_batch_size,
            seed=config.seed,
        )
        say(f"sanity check on {check_limit} held-out problems (rlkv should beat random):")
        say(run.check.table())
    return run


def split_heldout(pool: list, check_limit: int, limit: int | None) -> tuple[list, list]:
    """(training candidates: the first `limit` before the held-out ones, the last `check_limit` problems)."""
    if check_limit >= len(pool):
        raise ValueError(f"--check-limit {check_limit} leaves no training problems (the task has {len(pool)})")
    return pool[: len(pool) - check_limit][:limit], pool[len(pool) - check_limit :]


def join_torchrun() -> tuple[int, str | None]:
    """Under torchrun: join the process group and take this rank's GPU. Returns (rank, device or None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, None
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.distributed.get_rank(), f"cuda:{local}"
    return torch.distributed.get_rank(), "cpu"


def rank0_first(work: Callable[[], T]) -> T:
    """Run `work` on rank 0, then on the others (which find its cached result), without races."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return work()
    if dist.get_rank() == 0:
        result = work()
        dist.barrier()
        return result
    dist.barrier()
    return work()


def _kept(config: IdentifyConfig) -> str:
    if config.problems == "reliable":
        return f"solved in at least {config.min_pass:.0%} of {config.samples_per_problem} samples"
    if config.problems == "solved":
        return "solved at least once"
    return f"in the pass band {config.band}"


def _per_task(problems: list, examples: list) -> str:
    """' (math_train 1,020/8,400, gsm8k_train ...)' for a mix of tasks, else ''."""
    names = list(dict.fromkeys(ex.meta.get("task") for ex in examples))
    if len(names) < 2:
        return ""
    counts = [
        f"{name} {sum(ex.meta.get('task') == name for ex in problems):,}/"
        f"{sum(ex.meta.get('task') == name for ex in examples):,}"
        for name in names
    ]
    return f" ({', '.join(counts)})"


def _curriculum(model, tokenizer, task, examples: list, config: IdentifyConfig, out: Path) -> list:
    """The training problems the full model's own samples keep, cached in out/curriculum.json."""
    engine = rollout_engine(model, tokenizer, None, config)
    rates = pass_rates(
        model,
        tokenizer,
        task,
        examples,
        config.samples_per_problem,
        config.max_new_tokens,
        cache_path=out / "curriculum.json",
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        seed=config.seed,
        engine=engine,
        batch_size=config.rollout_batch_size,
        reject_below=config.min_pass if config.problems == "reliable" else None,
    )
    return keep_problems(examples, rates, config.problems, config.min_pass, config.band)
