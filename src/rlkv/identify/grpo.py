"""RLKV head identification: train the per-KV-head gates with GRPO, everything else frozen.

One step (the "paper" recipe follows the authors' AReaL code; "rlkv-v0" is rlkv's first recipe):

1. Take the next `batch_problems` problems (a seeded permutation per epoch, so the data order is
   a pure function of the step and a resumed run sees the same problems).
2. Sample `group` completions per problem at `temperature` / `top_p` / `top_k` from the current
   gated policy (`rlkv.generate` with `Gated` gates, the streaming branch at the config's `block`
   granularity): with `rlkv.Engine` in gated mode (one fused
   pass per step for both branches, CUDA graphs, continuous batching; the default on a GPU) or with
   `model.generate` inside `gated(model, alpha)`. Engine rollouts are seeded per (step, rollout of
   the step), so a resumed run, or one split over any number of ranks, draws the same ones.
3. Grade them (reward 1 / 0, the answer found by the config's `answer_rule`) and turn the rewards
   into advantages (`rlkv.identify.objective`):
   "batch" (paper: shaped, normalised over the whole batch's completion tokens) or "group"
   (within each problem's group). No KL term, no reference model.
4. Policy-gradient loss = -(sum over sampled completion tokens of advantage * log p) / (number
   of completion tokens in the batch), log p under the gated model, computed in micro-batches of
   at most `train_tokens` padded tokens whose gradients accumulate (completions with advantage 0
   contribute nothing and are skipped), never holding a micro-batch's full-vocabulary logits.
5. Sparsity penalty: penalty_weight(mean reward) * mean(|alpha|), which only acts once the batch
   is solved often enough (mean reward > tau) and grows with the reward.
6. Clip the gradient norm to `grad_clip` (paper: 1.0), AdamW step on alpha (paper: lr 1e-2
   constant, weight decay 0.017), then clamp alpha to [0, 1], the value every forward sees.

Each step appends a line to out_dir/log.jsonl (the batch's mean reward against tau and whether the
penalty acted, response lengths and how many hit the cap, the gates' spread, times, peak GPU
memory; `rlkv.identify.progress` plots it). Every `checkpoint_every` steps (and at the end)
alpha, the optimizer, every rank's Python/torch/CUDA RNG states and the step are saved atomically to
out_dir/checkpoint.pt; a new call with the same out_dir resumes from there and continues exactly
as the uninterrupted run would. The result is a HeadScores (method "rlkv") in out_dir/heads.json;
with `heads_every`, every heads_every-th step's gates are kept too, as out_dir/heads_step{N:04d}.json.

Under torchrun (torch.distributed initialised) each rank samples and grades its share of the
step's problems; token counts and rewards are summed over ranks, and so are the policy-gradient
gradients of alpha, so every rank takes the same optimizer step. Rank 0 writes the log, the
checkpoint and the heads. A single process (GPU or CPU) is the same code with world size 1.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from rlkv.engine import Gated, engine_for
from rlkv.generation import generate, prompt_ids
from rlkv.heads import HeadScores, command_line
from rlkv.hf.gated import gated, init_gates
from rlkv.identify.objective import advantages, penalty_weight
from rlkv.identify.recipe import KEEP_RULES, IdentifyConfig
from rlkv.models import Layout, eos_ids


def rollout_engine(model, tokenizer, method, config: IdentifyConfig):
    """The rlkv.Engine for rollouts (curriculum sampling: method None) when config.rollout_engine asks, else None."""
    cuda = next(model.parameters()).device.type == "cuda"
    return engine_for(
        config.rollout_engine,
        model,
        tokenizer,
        method,
        max_batch=config.rollout_batch_size,
        kv_budget=config.rollout_kv_budget if cuda else "256MiB",
    )  # a share of free memory needs CUDA


LOGPROB_CHUNK = 2048  # completion tokens whose full-vocabulary logits exist at once (float32: 1.2 GB at 151k)


def completion_logprobs(model, rollouts, temperature: float, pad_id: int) -> torch.Tensor:
    """Log-probs [n] of every completion token of `rollouts` (row by row, in order) under `model`.

    The decoder runs once over the right-padded rows (every query then has a real key to attend
    to: a left-padded row's padding queries would have none, and their NaN gradients would poison
    the gates). The output head and log-softmax run on `LOGPROB_CHUNK` completion tokens at a time
    and are recomputed in the backward pass, so no full-vocabulary logits of the micro-batch are
    ever held: prompt and padding positions never reach the head.
    """
    seqs = [p + c for p, c, _ in rollouts]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    comp = torch.zeros_like(ids, dtype=torch.bool)
    for row, ((prompt, _, _), seq) in enumerate(zip(rollouts, seqs)):
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
        comp[row, len(prompt) : len(seq)] = True
    ids, attn, comp = ids.to(model.device), attn.to(model.device), comp.to(model.device)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
    predicts = comp[:, 1:]  # position t predicts token t + 1
    states, targets = hidden[:, :-1][predicts], ids[:, 1:][predicts]
    head = model.get_output_embeddings()
    chunks = [
        torch.utils.checkpoint.checkpoint(
            _token_logprobs,
            head,
            states[i : i + LOGPROB_CHUNK],
            targets[i : i + LOGPROB_CHUNK],
            temperature,
            use_reentrant=False,
        )
        for i in range(0, len(targets), LOGPROB_CHUNK)
    ]
    return torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)


def _token_logprobs(head, states: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(states).float() / temperature
    return logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of sequences of `lengths` grouped longest first so that each group's padded size (rows x longest)
    stays within `max_tokens`; a sequence longer than that is a group of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@contextmanager
def _checkpointing(model, enabled: bool):
    """transformers' gradient checkpointing (non-reentrant: only the gates need gradients) inside the block."""
    if not enabled:
        yield
        return
    was_training = model.training
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    model.train()  # transformers checkpoints only in training mode; these models have no dropout in use
    try:
        yield
    finally:
        disable()
        model.train(was_training)


def _batch(examples, step: int, size: int, seed: int):
    """The problems of `step`: consecutive slices of a seeded permutation of `examples`, per epoch."""
    picked = []
    for pos in range(step * size, (step + 1) * size):
        epoch, i = divmod(pos, len(examples))
        order = list(range(len(examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        picked.append(examples[order[i]])
    return picked


def _resumable(config: dict) -> dict:
    """The settings a resumed run must share with the checkpoint (steps may grow, checkpoints may change)."""
    how = (
        "steps",
        "checkpoint_every",
        "heads_every",
        "rollout_kv_budget",
        "rollout_batch_size",
        "train_tokens",
        "gradient_checkpointing",
    )  # how the run executes, not what it computes
    return {k: v for k, v in config.items() if k not in how}


def _save(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def identify(
    model,
    tokenizer,
    task,
    examples,
    config: IdentifyConfig | None = None,
    out_dir: str | os.PathLike = "identify",
    on_step: Callable[[dict], None] | None = None,
) -> HeadScores:
    """Learn per-KV-head gates for `model` on `examples` of `task`; returns (and writes) HeadScores.

    `on_step(record)` is called after each step's log line and checkpoint (e.g. for live plots).
    """
    layout = Layout.of(model)
    config = (config or IdentifyConfig()).for_model(layout)
    task = rewarded(task, config.answer_rule)
    if not examples:
        raise ValueError("identify needs at least one training example (did the curriculum keep none?)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # frozen while training the gates; restored at the end
        p.requires_grad_(False)
    try:
        return _train(model, tokenizer, task, examples, config, out_dir, layout, on_step)
    finally:
        for p in trainable:
            p.requires_grad_(True)


def rewarded(task, answer_rule: str):
    """`task` with its rewards found by `answer_rule` (tasks graded on a final answer; others only by "rlkv",
    their own grading)."""
    if hasattr(task, "with_answer_rule"):
        return task.with_answer_rule(answer_rule)
    if answer_rule != "rlkv":
        raise ValueError(
            f"answer rule {answer_rule!r} applies to tasks graded on a final answer, not {task.name!r}: "
            "use answer_rule='rlkv' (the task's own grading)"
        )
    return task


def _world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed (torchrun), else (0, 1)."""
    if _distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (the identity in a single process)."""
    if _distributed():
        torch.distributed.all_reduce(t)
    return t


def _all_max(t: torch.Tensor) -> torch.Tensor:
    """The maximum of `t` over ranks (itself in a single process)."""
    if _distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def _gather(obj, world: int) -> list:
    """`obj` of every rank, in rank order (RNG states for the checkpoint)."""
    if not _distributed():
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _train(model, tokenizer, task, examples, config, out_dir, layout, on_step) -> HeadScores:
    """The loop of the module docstring: resume, then per step rollouts, update, log and checkpoint; the heads."""
    rank, world = _world()
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "log.jsonl"
    alpha = init_gates(model, config.init, getattr(torch, config.gate_dtype))
    opt = torch.optim.AdamW([alpha], lr=config.lr, weight_decay=config.weight_decay)
    step = _resume(ckpt_path, log_path, alpha, opt, config, rank, world)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids(model, tokenizer)[0]
    gates = Gated(alpha, config.sink, config.recent, config.block)
    engine = rollout_engine(model, tokenizer, gates, config)

    bar = tqdm(total=config.steps, initial=step, desc="rlkv identify", dynamic_ncols=True, disable=rank != 0)
    cuda = alpha.device.type == "cuda"
    while step < config.steps:
        t0 = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats(alpha.device)
        problems = _batch(examples, step, config.batch_problems, config.seed)[rank::world]  # this rank's share
        rollouts, rewards = _rollouts(model, tokenizer, task, problems, gates, engine, config, step, rank, world)
        t1 = time.perf_counter()
        record = _update(model, alpha, opt, rollouts, rewards, config, pad_id, step)
        step += 1
        a = alpha.detach().float()
        record = {
            "step": step,
            **record,
            "alpha_mean": float(a.mean()),
            "alpha_std": float(a.std()),
            "alpha_min": float(a.min()),
            "alpha_max": float(a.max()),
            "frac_alpha_below_half": float((a < 0.5).float().mean()),
            "rollout_s": t1 - t0,
            "update_s": time.perf_counter() - t1,
            "peak_gib": torch.cuda.max_memory_allocated(alpha.device) / 2**30 if cuda else None,
        }
        _log_and_checkpoint(record, alpha, opt, config, log_path, ckpt_path, rank, world)
        if config.heads_every and step % config.heads_every == 0 and step < config.steps:
            _heads(alpha, layout, task, examples, config, step, out_dir / f"heads_step{step:04d}.json", rank)
        bar.update(1)
        bar.set_postfix(reward=f"{record['mean_reward']:.2f}", alpha=f"{record['alpha_mean']:.3f}")
        if on_step is not None:
            on_step(record)
    bar.close()
    return _heads(alpha, layout, task, examples, config, step, out_dir / "heads.json", rank)


def _resume(ckpt_path: Path, log_path: Path, alpha, opt, config, rank: int, world: int) -> int:
    """Seed the RNGs, then restore the gates, optimizer and RNG states of the checkpoint if there is one;
    the log keeps only the steps it covers (the others will be redone). Returns the step to start at."""
    step = 0
    random.seed(config.seed)
    torch.manual_seed(config.seed + rank)  # each rank samples its own rollouts
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if _resumable(state["config"]) != _resumable(asdict(config)):
            raise ValueError(f"{ckpt_path} was written with another config; use a new out_dir or the same config")
        with torch.no_grad():
            alpha.copy_(state["alpha"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        if len(state["rank_rngs"]) != world:
            raise ValueError(
                f"{ckpt_path} was written by {len(state['rank_rngs'])} ranks; resume it with as many, not {world}"
            )
        python_rng, torch_rng, cuda_rng = state["rank_rngs"][rank]
        random.setstate(python_rng)
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_rng)
    if log_path.exists():
        lines = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in lines))
    return step


def _log_and_checkpoint(
    record: dict, alpha, opt, config, log_path: Path, ckpt_path: Path, rank: int, world: int
) -> None:
    """Append the step's log line (rank 0) and, every `checkpoint_every` steps and at the end, save the
    checkpoint with every rank's RNG states."""
    step = record["step"]
    if rank == 0:
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    if step % config.checkpoint_every == 0 or step == config.steps:
        rngs = _gather(
            (
                random.getstate(),
                torch.get_rng_state(),
                torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            ),
            world,
        )
        if rank == 0:
            _save(
                {
                    "alpha": alpha.detach().cpu(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "data_position": step * config.batch_problems,
                    "rank_rngs": rngs,
                    "config": asdict(config),
                },
                ckpt_path,
            )


def _heads(alpha, layout, task, examples, config, steps: int, path: Path, rank: int) -> HeadScores:
    """The gates after `steps` steps as HeadScores with their provenance; rank 0 writes them to `path`."""
    provenance = {
        "config": asdict(config),
        "steps": steps,
        "task": task.name,
        "problems": len(examples),
        "command": command_line(),
        "keep_rule": KEEP_RULES[config.recipe],
    }
    if rank == 0:  # the log (all steps, resumed ones too) is rank 0's
        records = [json.loads(line) for line in (path.parent / "log.jsonl").read_text().splitlines() if line]
        records = [r for r in records if r["step"] <= steps]
        provenance["penalty_steps"] = sum(r["penalty_weight"] > 0 for r in records)  # steps whose reward cleared tau
    scores = HeadScores(
        alpha.detach().float(), model=layout.name, layout=layout.to_dict(), method="rlkv", provenance=provenance
    )
    if rank == 0:
        scores.save(path)
    return scores


def _rollouts(model, tokenizer, task, problems, gates: Gated, engine, config, step: int, rank: int, world: int):
    """`config.group` completions per problem from the current gated policy, and their rewards.

    A rollout is (prompt ids, completion ids up to and with EOS, text). The engine reads alpha in
    place, so its rollouts use the current gates; transformers `generate` draws from the torch RNG.
    """
    prompts = prompt_ids(tokenizer, [task.prompt(ex, tokenizer) for ex in problems for _ in range(config.group)])
    base = (config.seed * 1_000_003 + step) * 65_537
    # seeded by the rollout's place in the whole step (this rank holds problems rank, rank + world, ...), so
    # engine rollouts are the same whatever the number of ranks
    seeds = [base + (rank + k * world) * config.group + j for k in range(len(problems)) for j in range(config.group)]
    outs = generate(
        model,
        tokenizer,
        prompts,
        gates,
        engine=engine or "off",
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        seed=seeds,
        batch_size=config.rollout_batch_size,
    )
    rollouts = [(ids, o.tokens, o.text) for ids, o in zip(prompts, outs)]  # (prompt ids, completion ids, text)
    graded = [ex for ex in problems for _ in range(config.group)]
    rewards = torch.tensor(task.grade_many(graded, [text for _, _, text in rollouts]), dtype=torch.float32)
    return rollouts, rewards


def _update(model, alpha, opt, rollouts, rewards, config, pad_id, step: int) -> dict:
    """One optimizer step on the gates from this rank's rollouts (gradients summed over ranks); its log entries.

    The clipped PPO objective of the authors' recipe (eps_clip 0.4, one minibatch, log-probs
    recomputed under the current gates) has importance ratio 1 at its only update, so its
    gradient is this policy gradient: the rollouts come from the very gates being updated.
    """
    lengths = torch.tensor([len(c) for _, c, _ in rollouts], dtype=torch.float64)
    adv = advantages(
        config.advantages, rewards.to(alpha.device), config.group, lengths.to(alpha.device), config.eps, _all_sum
    ).cpu()
    capped = float((lengths >= config.max_new_tokens).sum())
    totals = _all_sum(
        torch.tensor(
            [float(lengths.sum()), float(rewards.sum()), len(rewards), capped], dtype=torch.float64, device=alpha.device
        )
    )
    longest = _all_max(torch.tensor(float(lengths.max()) if len(lengths) else 0.0, device=alpha.device))
    n_tokens = max(1, int(totals[0]))
    mean_reward = float(totals[1] / totals[2])  # the whole batch's, over every rank
    weight = penalty_weight(mean_reward, config.beta, config.tau)
    opt.zero_grad(set_to_none=True)
    active = [i for i in range(len(rollouts)) if adv[i] != 0 and rollouts[i][1]]
    sizes = [len(rollouts[i][0]) + len(rollouts[i][1]) for i in active]
    pg_loss = 0.0
    with (
        gated(model, alpha, config.sink, config.recent, config.block),
        _checkpointing(model, config.gradient_checkpointing),
    ):
        for group in micro_batches(sizes, config.train_tokens):
            rows = [active[j] for j in group]
            logp = completion_logprobs(model, [rollouts[i] for i in rows], config.temperature, pad_id)
            per_token = torch.cat([adv[i].expand(len(rollouts[i][1])) for i in rows]).to(logp.device)
            loss = -(per_token * logp).sum() / n_tokens
            loss.backward()
            pg_loss += loss.detach().item()
    if alpha.grad is None:
        alpha.grad = torch.zeros_like(alpha)
    _all_sum(alpha.grad)  # policy-gradient terms of every rank's rollouts
    if not torch.isfinite(alpha.grad).all():
        raise FloatingPointError(f"step {step + 1}: the gate gradient is not finite; the gates are left as they were")
    penalty = weight * alpha.abs().mean()
    if weight > 0:
        penalty.backward()
    grad_norm = float(alpha.grad.norm())
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([alpha], config.grad_clip)
    opt.step()
    with torch.no_grad():
        alpha.clamp_(0.0, 1.0)  # the gates every forward sees (the authors clamp before each one)
    return {
        "mean_reward": mean_reward,
        "penalty_weight": weight,
        "loss": pg_loss + float(penalty.detach()),
        "pg_loss": pg_loss,
        "grad_norm": grad_norm,
        "mean_response_tokens": float(totals[0] / totals[2]),
        "max_response_tokens": int(longest),
        "capped_rollouts": int(totals[3]),  # rollouts that reached max_new_tokens
        "tau": config.tau,
        "penalty_acted": weight > 0,
    }
