"""RLKV identification: gated attention against the plain and streaming references, exact
gradients to the gates, the penalty schedule, resumable training and the curriculum cache."""

import dataclasses
import importlib
import json
import math
import zlib

import pytest
import torch
from conftest import DEVICE, tiny_model, tiny_tokenizer
from conftest import left_padded_batch as batch
from transformers import DynamicCache

import rlkv
from rlkv.hf.plumbing import CACHE_KWARG
from rlkv.identify import (
    IdentifyConfig,
    batch_advantages,
    gated,
    group_advantages,
    grpo,
    identify,
    init_gates,
    penalty_weight,
    select_problems,
)

SINK, RECENT = 2, 4


def test_open_gates_equal_the_plain_model(arch):
    model = tiny_model(arch)
    ids, mask = batch((20, 13, 7), 20)
    plain = model(input_ids=ids, attention_mask=mask).logits
    with gated(model, init_gates(model), SINK, RECENT):
        out = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"  # restored
    real = mask.bool()
    torch.testing.assert_close(out[real], plain[real], rtol=0, atol=1e-6)


def test_closed_gates_equal_the_streaming_reference(arch):
    model = tiny_model(arch)
    ids, mask = batch((20, 13, 7), 20)
    with gated(model, init_gates(model, 0.0), SINK, RECENT):
        out = model(input_ids=ids, attention_mask=mask).logits
    with rlkv.compress(
        model, None, sparsity=1.0, sink=SINK, recent=RECENT, prefill="compressed"
    ):  # gates: the prompt too
        ref = model(input_ids=ids, attention_mask=mask, **{CACHE_KWARG: DynamicCache()}).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)


def test_block_streaming_gates_equal_the_masked_reference():
    """Gated attention at block granularity against masked_attention with the block rule, padded rows too."""
    from rlkv.attention.reference import gate_mix, keep_keys_mask, masked_attention, token_positions

    model = tiny_model("qwen2")
    alpha = torch.rand(3, 2, generator=torch.Generator().manual_seed(5))
    ids, mask = batch((20, 13, 7), 20)
    pos, _ = token_positions(mask, 3, 20, "cpu")

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        alpha_l, none = alpha[module.layer_idx], torch.zeros(2, dtype=torch.bool)
        full = masked_attention(query, key, value, keep_keys_mask(pos, pos, ~none, 0, 1), scaling)
        stream = masked_attention(query, key, value, keep_keys_mask(pos, pos, none, 2, 4, block=4), scaling)
        return gate_mix(full, stream, alpha_l, query.shape[1] // key.shape[1], head_dim=2), None

    with gated(model, alpha, 2, 4, block=4):
        out = model(input_ids=ids, attention_mask=mask).logits
    from transformers import AttentionInterface

    AttentionInterface.register("test_block_reference", reference)
    model.set_attn_implementation("test_block_reference")
    try:
        ref = model(input_ids=ids, attention_mask=mask).logits
    finally:
        model.set_attn_implementation("sdpa")
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    with gated(model, alpha, 2, 4):  # token-exact streaming differs here: the test can tell them apart
        token = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(token[real], ref[real], atol=1e-4)


def test_gated_generate_with_cache_equals_a_full_forward():
    """Decoding with a DynamicCache under the gates gives the logits of one gated pass."""
    model = tiny_model("qwen2")
    alpha = torch.rand(3, 2, generator=torch.Generator().manual_seed(3))
    ids, mask = batch((14, 9), 14)
    with gated(model, alpha, SINK, RECENT):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :6])], dim=1)
        logits = model(input_ids=out.sequences, attention_mask=full_mask).logits[:, 13:-1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), logits, rtol=1e-5, atol=1e-5)


def test_gradient_to_alpha_matches_finite_differences():
    model = tiny_model("llama").double()
    ids, mask = batch((16, 11), 16)
    alpha = torch.nn.Parameter(
        torch.rand(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.8 + 0.1
    )
    weights = torch.randn(2, 16, 96, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def loss(a):
        with gated(model, a, SINK, RECENT):
            return (model(input_ids=ids, attention_mask=mask).logits * weights * mask[..., None]).sum()

    loss(alpha).backward()
    eps = 1e-2  # RMSNorm computes in float32 even in a float64 model: smaller steps drown in its rounding

    numeric = torch.zeros_like(alpha)
    with torch.no_grad():
        for idx in [(layer, h) for layer in range(3) for h in range(2)]:
            plus, minus = alpha.detach().clone(), alpha.detach().clone()
            plus[idx] += eps
            minus[idx] -= eps
            numeric[idx] = (loss(plus) - loss(minus)) / (2 * eps)
    assert alpha.grad.abs().min() > 1e-6  # every gate matters here
    torch.testing.assert_close(alpha.grad, numeric, rtol=1e-3, atol=1e-4)


def test_bad_alpha_shape_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        with gated(model, torch.ones(2, 2), SINK, RECENT):
            pass


def test_penalty_weight():
    assert penalty_weight(0.5, 1e-3, 0.5) == 0.0  # at tau: off
    assert penalty_weight(0.2, 1e-3, 0.5) == 0.0
    assert penalty_weight(0.75, 1e-3, 0.5) == pytest.approx(1e-3 * (math.exp(0.75) - 1))
    assert penalty_weight(1.0, 2.0, 0.0) == pytest.approx(2.0 * (math.e - 1))


def test_group_advantages_are_normalised_per_problem():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), 1e-6)
    assert torch.allclose(adv[0].mean(), torch.tensor(0.0)) and adv[0, 0] > 0 > adv[0, 1]
    assert torch.equal(adv[1], torch.zeros(4))


def _setup(**overrides):
    model = tiny_model("qwen2", layers=2)
    task = rlkv.tasks.get("arith")
    examples = task.load(seed=0, limit=4, difficulty=1)
    settings = dict(
        sink=8,
        recent=16,
        batch_problems=2,
        group=2,
        steps=3,
        max_new_tokens=6,
        checkpoint_every=1,
        rollout_batch_size=4,
        train_tokens=64,  # several micro-batches per step
        block=4,  # block-sparse streaming (the paper recipe's rule) at the tiny model's scale
        gate_dtype="float32",  # exact arithmetic in the tests; bf16 gates: test_bf16_gates_train_in_bf16
    )
    config = IdentifyConfig(**{**settings, **overrides})
    return model, tiny_tokenizer(), task, examples, config


def _coin_rewards(monkeypatch, task):
    """Random-looking but deterministic rewards (a tiny random model never solves arith)."""
    monkeypatch.setattr(task, "grade_many", lambda exs, texts: [float(len(t) % 2) for t in texts])


@pytest.mark.parametrize("rollout_engine", ["off", "on"])
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, monkeypatch, rollout_engine):
    model, tok, task, examples, config = _setup(rollout_engine=rollout_engine)
    _coin_rewards(monkeypatch, task)
    straight = identify(model, tok, task, examples, config, tmp_path / "a")

    class Stop(Exception):
        pass

    def stop_after_one(record):
        if record["step"] == 1:
            raise Stop

    with pytest.raises(Stop):
        identify(model, tok, task, examples, config, tmp_path / "b", on_step=stop_after_one)
    torch.manual_seed(12345)  # the restart must not depend on the process's RNG state
    resumed = identify(model, tok, task, examples, config, tmp_path / "b")
    assert torch.equal(straight.scores, resumed.scores)
    assert (
        resumed.provenance["penalty_steps"] == straight.provenance["penalty_steps"]
    )  # counted over the resumed steps too
    assert not torch.equal(straight.scores, torch.ones(2, 2))  # the gates did move
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert rlkv.HeadScores.load(tmp_path / "b" / "heads.json").method == "rlkv"
    assert all(p.requires_grad for p in model.parameters())  # restored after training


def test_penalty_alone_closes_gates_when_every_rollout_is_rewarded(tmp_path, monkeypatch):
    """All rewards 1: advantages are 0, so only the sparsity penalty acts and alpha must fall."""
    model, tok, task, examples, config = _setup(beta=1.0)
    monkeypatch.setattr(task, "grade_many", lambda exs, texts: [1.0] * len(texts))
    heads = identify(model, tok, task, examples, config, tmp_path)
    assert (heads.scores < 1).all() and heads.scores.min() >= 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["penalty_weight"] == pytest.approx(math.e - 1)
    assert log[-1]["alpha_mean"] < log[0]["alpha_mean"] < 1
    assert heads.provenance["penalty_steps"] == 3


def test_gates_start_at_init(tmp_path, monkeypatch):
    """All rewards 1, no penalty, no weight decay: nothing moves the gates, so they end where --init put them."""
    model, tok, task, examples, config = _setup(beta=0.0, init=0.8, weight_decay=0.0)
    monkeypatch.setattr(task, "grade_many", lambda exs, texts: [1.0] * len(texts))
    assert torch.equal(identify(model, tok, task, examples, config, tmp_path).scores, torch.full((2, 2), 0.8))
    with pytest.raises(ValueError, match="init"):
        IdentifyConfig(init=1.5)


def _solved_per_problem(monkeypatch, task, examples, solved: tuple[int, ...], tmp_path) -> dict:
    """Grade the k-th sample of each problem correct while k <= its entry of `solved` (of 3 samples per
    problem); returns select_problems' keyword arguments for that setting."""
    solved = dict(zip((ex.id for ex in examples), solved))

    def grade_many(exs, texts):
        seen = {}
        for ex in exs:
            seen[ex.id] = seen.get(ex.id, 0) + 1
            yield float(seen[ex.id] <= solved[ex.id])

    monkeypatch.setattr(task, "grade_many", lambda exs, texts: list(grade_many(exs, texts)))
    return dict(samples_per_problem=3, max_new_tokens=4, cache_path=tmp_path / "c.json", batch_size=6)


def test_curriculum_cache_is_reused(tmp_path, monkeypatch):
    model, tok, task, examples, _ = _setup()
    calls = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    args = _solved_per_problem(monkeypatch, task, examples, (1, 3, 0, 2), tmp_path)
    first = select_problems(model, tok, task, examples, keep="band", **args)
    assert calls and first == [examples[0], examples[3]]  # default band: some but not all correct
    calls.clear()
    assert select_problems(model, tok, task, examples, keep="band", **args) == first
    assert select_problems(model, tok, task, examples, keep="band", band=(0.5, 1.0), **args) == [examples[3]]
    assert select_problems(model, tok, task, examples, **args) == [examples[1]]  # reliable: 3 of 3 >= 0.75
    assert select_problems(model, tok, task, examples, min_pass=0.6, **args) == [examples[1], examples[3]]
    assert calls == []  # all answered from the cache
    key = json.loads(next(iter(json.loads((tmp_path / "c.json").read_text()))))
    assert key["answer_rule"] == "rlkv" and key["samples"] == 3  # the grading is part of what a score means


def test_curriculum_samples_in_one_call_and_keeps_finished_problems_when_interrupted(tmp_path, monkeypatch):
    """Every sample in one generate call; problems are saved as they finish, so a run that breaks off keeps
    them and samples only the rest when called again."""
    from rlkv.identify.curriculum import pass_rates

    model, tok, task, examples, _ = _setup()
    args = _solved_per_problem(monkeypatch, task, examples, (1, 3, 0, 2), tmp_path)
    args["batch_size"] = 6  # transformers generate: two problems x 3 samples per model.generate
    calls = []
    real_generate = model.generate

    def breaks_on_the_second_call(*a, **k):
        calls.append(k["input_ids"].shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    monkeypatch.setattr(model, "generate", breaks_on_the_second_call)
    with pytest.raises(KeyboardInterrupt):
        pass_rates(model, tok, task, examples, save_every=0.0, **args)
    saved = next(iter(json.loads((tmp_path / "c.json").read_text()).values()))
    assert sorted(saved) == sorted(ex.id for ex in examples[:2])  # the first call's two problems
    calls.clear()
    monkeypatch.setattr(
        model, "generate", lambda *a, **k: calls.append(k["input_ids"].shape[0]) or real_generate(*a, **k)
    )
    rates = pass_rates(model, tok, task, examples, **args)
    assert calls == [6]  # only the last two problems were sampled
    assert [rates[ex.id] for ex in examples] == [1 / 3, 1.0, 0.0, 2 / 3]


def test_reliable_curriculum_skips_the_samples_that_cannot_change_its_verdict(tmp_path, monkeypatch):
    """reject_below=0.75 of 4: every problem draws 2 samples and only those with one right draw 2 more. The
    engine seeds each (problem, sample), so the problems kept and the kept problems' scores are those of all
    4 samples; a later call without reject_below draws just the samples a ruled-out problem lacks."""
    from rlkv.identify.curriculum import keep_problems, pass_rates
    from rlkv.identify.grpo import rollout_engine

    model, tok, task, _, config = _setup(rollout_engine="on")
    examples = task.load(seed=0, limit=16, difficulty=1)
    graded = []
    monkeypatch.setattr(
        task,
        "grade_many",
        lambda exs, texts: graded.extend(texts) or [float(zlib.crc32(t.encode()) % 2) for t in texts],
    )
    engine = rollout_engine(model, tok, None, config)
    args = dict(samples_per_problem=4, max_new_tokens=6, temperature=1.0, engine=engine)
    full = pass_rates(model, tok, task, examples, cache_path=tmp_path / "full.json", **args)
    assert len(graded) == 64
    graded.clear()
    early = pass_rates(model, tok, task, examples, cache_path=tmp_path / "early.json", reject_below=0.75, **args)
    kept = keep_problems(examples, full)
    assert keep_problems(examples, early) == kept and 0 < len(kept) < len(examples)
    cached = next(iter(json.loads((tmp_path / "early.json").read_text()).values()))
    ruled_out = [ex.id for ex in examples if len(cached[ex.id]) == 2]
    assert ruled_out and all(cached[i] == [0, 0] and early[i] == 0.0 for i in ruled_out)
    assert len(graded) == 64 - 2 * len(ruled_out)
    assert all(early[ex.id] == full[ex.id] for ex in examples if ex.id not in ruled_out)
    graded.clear()
    assert pass_rates(model, tok, task, examples, cache_path=tmp_path / "early.json", **args) == full
    assert len(graded) == 2 * len(ruled_out)


def test_torch_distributed_world_of_one_takes_the_same_steps(tmp_path, monkeypatch):
    """The torchrun path (all-reduced rewards, tokens and gate gradients; gathered RNGs) equals a plain run."""
    import torch.distributed as dist

    model, tok, task, examples, config = _setup()
    _coin_rewards(monkeypatch, task)
    plain = identify(model, tok, task, examples, config, tmp_path / "plain")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        distributed = identify(model, tok, task, examples, config, tmp_path / "dist")
    finally:
        dist.destroy_process_group()
    assert torch.equal(plain.scores, distributed.scores)
    grpo = importlib.import_module("rlkv.identify.grpo")  # (the attribute rlkv.identify is the function)
    monkeypatch.setattr(grpo, "_world", lambda: (0, 2))
    with pytest.raises(ValueError, match="written by 1 ranks; resume it with as many, not 2"):
        identify(model, tok, task, examples, config, tmp_path / "plain")


def _rewards_by_sampled_text(examples, texts) -> list[float]:
    """0/1 by the characters sampled (the tiny model's 6-token texts all have odd lengths)."""
    return [float(sum(map(ord, t)) % 2) for t in texts]


def _rank_of_two(rank: int, out: str) -> None:
    """One of two gloo ranks on 127.0.0.1 (as `torchrun --nnodes` would start them), engine rollouts."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["RLKV_TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, tok, task, examples, config = _setup(rollout_engine="on")
        task.grade_many = _rewards_by_sampled_text
        identify(model, tok, task, examples, config, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_take_the_steps_of_one_process(tmp_path, monkeypatch):
    """`torchrun --nproc-per-node 2` on a CPU (gloo): rollouts split over ranks, seeded by their place in the step,
    rewards and gradients summed, give the gates of a single process."""
    import socket

    import torch.multiprocessing as mp

    model, tok, task, examples, config = _setup(rollout_engine="on")
    monkeypatch.setattr(task, "grade_many", _rewards_by_sampled_text)
    single = identify(model, tok, task, examples, config, tmp_path / "one")
    rewards = [r["mean_reward"] for r in map(json.loads, (tmp_path / "one" / "log.jsonl").read_text().splitlines())]
    assert 0 < min(rewards) < 1 or 0 < max(rewards) < 1  # the rollouts decide the gradient
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("RLKV_TEST_PORT", str(s.getsockname()[1]))
    mp.start_processes(_rank_of_two, args=(str(tmp_path / "two"),), nprocs=2, start_method="spawn")
    two = rlkv.HeadScores.load(tmp_path / "two" / "heads.json")
    torch.testing.assert_close(two.scores, single.scores, rtol=0, atol=1e-5)
    assert not torch.equal(single.scores, torch.ones(2, 2))  # the gates moved
    state = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert len(state["rank_rngs"]) == 2


def test_gradient_checkpointing_gives_the_same_gates(tmp_path, monkeypatch):
    model, tok, task, examples, config = _setup()
    _coin_rewards(monkeypatch, task)
    config.gradient_checkpointing = False
    plain = identify(model, tok, task, examples, config, tmp_path / "plain")
    config.gradient_checkpointing = True
    checkpointed = identify(model, tok, task, examples, config, tmp_path / "ckpt")
    torch.testing.assert_close(checkpointed.scores, plain.scores, rtol=0, atol=1e-6)
    assert not model.training and not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_batched_completion_logprobs_equal_each_rollout_alone():
    """Right-padded micro-batches: every completion token's log p is the one it has alone, and the one
    log_softmax of the model's own full logits gives."""
    completion_logprobs = grpo.completion_logprobs
    model = tiny_model("qwen2", layers=2)
    rollouts = [([5, 6, 7], [8, 9, 10, 11], ""), ([12] * 9, [13, 14], ""), ([15, 16], [17], "")]
    alpha = torch.full(rlkv.Layout.of(model).shape, 0.5, device=DEVICE)
    with gated(model, alpha, 1, 2):
        logp = completion_logprobs(model, rollouts, 0.7, pad_id=0)
        assert logp.shape == (7,)
        alone = torch.cat([completion_logprobs(model, [r], 0.7, pad_id=0) for r in rollouts])
        torch.testing.assert_close(logp, alone, rtol=1e-5, atol=1e-5)
        prompt, completion, _ = rollouts[0]
        ids = torch.tensor([prompt + completion], device=DEVICE)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None])[:, 0]
        torch.testing.assert_close(logp[:4], expected, rtol=1e-5, atol=1e-5)


def test_logprobs_are_chunked_without_changing_them_or_their_gradient(monkeypatch):
    """Chunks of LOGPROB_CHUNK completion tokens through the head, recomputed in backward: the same values
    and the same gradient to alpha as one chunk."""
    model = tiny_model("llama", layers=2)
    rollouts = [([5, 6, 7], [8, 9, 10, 11, 12], ""), ([12] * 9, [13, 14, 15], "")]
    results = []
    for chunk in (1000, 3):
        monkeypatch.setattr(grpo, "LOGPROB_CHUNK", chunk)
        alpha = torch.full(rlkv.Layout.of(model).shape, 0.5, device=DEVICE, requires_grad=True)
        with gated(model, alpha, 1, 2):
            logp = grpo.completion_logprobs(model, rollouts, 1.0, pad_id=0)
        logp.sum().backward()
        results.append((logp.detach(), alpha.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    assert results[0][1].abs().sum() > 0  # the gates got a gradient


def test_micro_batches_stay_within_the_token_budget():
    lengths = [10, 3, 7, 12, 5, 30]
    groups = grpo.micro_batches(lengths, 24)
    assert sorted(i for g in groups for i in g) == list(range(6))  # each sequence once
    assert groups[0] == [5]  # longer than the budget: alone
    assert all(len(g) * max(lengths[i] for i in g) <= 24 for g in groups[1:])
    assert groups[1:] == [[3, 0], [2, 4, 1]]  # longest first, packed while rows x longest fits


def test_bf16_gates_train_in_bf16(tmp_path, monkeypatch):
    """The paper recipe keeps the gates and AdamW's state in bf16, as the authors' AReaL run does."""
    model, tok, task, examples, config = _setup(gate_dtype="bfloat16", steps=1)
    _coin_rewards(monkeypatch, task)
    heads = identify(model, tok, task, examples, config, tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["alpha"].dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in state["optimizer"]["state"][0].values() if t.ndim)
    assert heads.scores.dtype == torch.float32 and not torch.equal(heads.scores, torch.ones(2, 2))


def test_a_non_finite_gate_gradient_stops_training(tmp_path, monkeypatch):
    model, tok, task, examples, config = _setup()
    monkeypatch.setattr(task, "grade_many", lambda exs, texts: [float(i % 2) for i in range(len(texts))])
    real = grpo.completion_logprobs
    monkeypatch.setattr(grpo, "completion_logprobs", lambda *a: real(*a) * float("nan"))
    with pytest.raises(FloatingPointError, match="step 1: the gate gradient is not finite"):
        identify(model, tok, task, examples, config, tmp_path)


# ---------------------------------------------------------------- the paper recipe


def test_batch_advantages_worked_example():
    """Two problems x 2 rollouts, rewards [1, 1 | 0, 1], completion tokens [2, 1, 1, 4] (8 tokens).

    Shaped: clip((r - 0.5) * 10, -20, 20) = [5, 5, -5, 5]. Token-weighted mean (10 + 5 - 5 + 20) / 8
    = 3.75; squared deviations weighted by tokens: 2 * 1.25^2 + 1.25^2 + 8.75^2 + 4 * 1.25^2 = 87.5;
    unbiased variance 87.5 / 7 = 12.5, std 3.5355339. Advantages (s - 3.75) / (3.5355339 + 1e-5):
    1.25 / 3.5355439 = 0.3535524 and -8.75 / 3.5355439 = -2.4748667. The all-correct first group
    gets a positive advantage (per-group normalisation gives it 0).
    """
    rewards, tokens = torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([2.0, 1.0, 1.0, 4.0])
    adv = batch_advantages(rewards, tokens, eps=1e-5)
    torch.testing.assert_close(adv, torch.tensor([0.3535524, 0.3535524, -2.4748667, 0.3535524]), rtol=1e-6, atol=1e-6)
    assert group_advantages(rewards.view(2, 2), 1e-6)[0].tolist() == [0.0, 0.0]
    assert torch.equal(batch_advantages(torch.ones(4), tokens), torch.zeros(4))  # no spread: no signal
    split = batch_advantages(rewards, tokens, all_sum=lambda t: 2 * t)  # two ranks with the same rollouts
    torch.testing.assert_close(split[2], torch.tensor(-8.75 / (math.sqrt(175 / 15) + 1e-5)))  # 16 tokens: var 175/15


def test_recipes_fill_unset_options_and_keep_explicit_ones():
    paper, v0 = IdentifyConfig(), IdentifyConfig(recipe="rlkv-v0")
    assert (
        paper.advantages,
        paper.problems,
        paper.weight_decay,
        paper.grad_clip,
        paper.steps,
        paper.max_new_tokens,
    ) == ("batch", "reliable", 0.017, 1.0, 186, 7168)
    assert (paper.samples_per_problem, paper.temperature, paper.top_p, paper.top_k) == (4, 0.6, 0.95, 20)
    assert (paper.block, paper.gate_dtype, paper.answer_rule, paper.train_tokens) == (128, "bfloat16", "authors", 7680)
    assert (paper.sink, paper.recent, paper.batch_problems, paper.group, paper.lr, paper.beta, paper.tau) == (
        128,
        256,
        32,
        4,
        1e-2,
        None,
        None,
    )  # beta and tau: the authors' per-model values (for_model)
    qwen2, llama, qwen3 = (paper.for_model(rlkv.Layout(arch, 2, 4, 2, 8)) for arch in ("qwen2", "llama", "qwen3"))
    assert (qwen2.tau, qwen2.beta, llama.tau, llama.beta, qwen3.tau, qwen3.beta) == (0.55, 1e-3, 0.5, 1e-3, 0.5, 2.5e-3)
    assert IdentifyConfig(tau=0.3).for_model(rlkv.Layout("qwen2", 2, 4, 2, 8)).tau == 0.3  # explicit wins
    assert (v0.advantages, v0.problems, v0.weight_decay, v0.grad_clip) == ("group", "band", 0.0, 0.0)
    assert (v0.block, v0.gate_dtype, v0.answer_rule, v0.temperature) == (1, "float32", "rlkv", 1.0)
    assert IdentifyConfig(advantages="group").problems == "reliable"  # one ablation switch, the rest paper
    for bad in (
        dict(recipe="duo"),
        dict(advantages="token"),
        dict(problems="all"),
        dict(top_p=0.0),
        dict(top_k=-1),
        dict(grad_clip=-1.0),
        dict(block=0),
        dict(gate_dtype="float16"),
        dict(answer_rule="any"),
        dict(min_pass=0.0),
        dict(tau=1.5),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            IdentifyConfig(**bad)


def _paper(**overrides):
    return _setup(**{"checkpoint_every": 2, "steps": 4, **overrides})


def test_resume_two_plus_two_steps_equals_four(tmp_path, monkeypatch):
    model, tok, task, examples, config = _paper()
    _coin_rewards(monkeypatch, task)
    straight = identify(model, tok, task, examples, config, tmp_path / "four")
    config.steps = 2
    identify(model, tok, task, examples, config, tmp_path / "resumed")
    config.steps = 4
    torch.manual_seed(999)
    resumed = identify(model, tok, task, examples, config, tmp_path / "resumed")
    assert torch.equal(straight.scores, resumed.scores) and not torch.equal(straight.scores, torch.ones(2, 2))
    logs = [
        [json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
        for d in ("four", "resumed")
    ]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    assert [r["grad_norm"] for r in logs[0]] == [r["grad_norm"] for r in logs[1]]
    assert resumed.provenance["keep_rule"] == "authors"


def test_heads_every_keeps_the_gates_of_earlier_steps(tmp_path, monkeypatch):
    """heads_every=2 over 4 steps: heads_step0002.json holds the gates a 2-step run ends with, and the last step's
    are heads.json alone; a run resumed with heads_every from a checkpoint written without it keeps its later
    steps' gates (how it runs, not what it computes)."""
    model, tok, task, examples, config = _paper(heads_every=2)
    _coin_rewards(monkeypatch, task)
    identify(model, tok, task, examples, config, tmp_path / "four")
    two = identify(model, tok, task, examples, dataclasses.replace(config, steps=2, heads_every=0), tmp_path / "two")
    kept = rlkv.HeadScores.load(tmp_path / "four" / "heads_step0002.json")
    assert torch.equal(kept.scores, two.scores) and not torch.equal(two.scores, torch.ones(2, 2))
    assert kept.provenance["steps"] == 2 and kept.provenance["penalty_steps"] == two.provenance["penalty_steps"]
    assert sorted(p.name for p in (tmp_path / "four").glob("heads*.json")) == ["heads.json", "heads_step0002.json"]
    identify(model, tok, task, examples, dataclasses.replace(config, heads_every=1), tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two").glob("heads*.json")) == ["heads.json", "heads_step0003.json"]
    with pytest.raises(ValueError, match="heads_every"):
        IdentifyConfig(heads_every=-1)


def test_penalty_switches_on_above_tau_only(tmp_path, monkeypatch):
    """Every rollout rewarded (mean reward 1, advantages 0): tau 1 keeps the penalty off, tau 0.99 turns it on."""
    ends = {}
    for tau in (1.0, 0.99):
        model, tok, task, examples, config = _paper(tau=tau, beta=1.0, weight_decay=0.0)
        monkeypatch.setattr(task, "grade_many", lambda exs, texts: [1.0] * len(texts))
        ends[tau] = identify(model, tok, task, examples, config, tmp_path / str(tau))
    assert torch.equal(ends[1.0].scores, torch.ones(2, 2)) and ends[1.0].provenance["penalty_steps"] == 0
    assert (ends[0.99].scores < 1).all() and ends[0.99].provenance["penalty_steps"] == 4


def test_gradients_are_clipped_and_gates_clamped(tmp_path, monkeypatch):
    """A penalty far larger than 1 in gradient norm: the step sees a norm of at most grad_clip, and a
    learning rate of 3 drives every gate below 0, where the clamp holds it at exactly 0."""
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(float(self.param_groups[0]["params"][0].grad.norm()))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    for clip in (1.0, 0.0):
        model, tok, task, examples, config = _paper(beta=1e3, lr=3.0, grad_clip=clip, steps=1)
        monkeypatch.setattr(task, "grade_many", lambda exs, texts: [1.0] * len(texts))
        heads = identify(model, tok, task, examples, config, tmp_path / str(clip))
        assert torch.equal(heads.scores, torch.zeros(2, 2))
        log = json.loads((tmp_path / str(clip) / "log.jsonl").read_text())
        assert log["grad_norm"] == pytest.approx(1e3 * (math.e - 1) / 4 * 2)  # |d mean|a| / da| = 1/4 on 4 gates
    assert seen[0] == pytest.approx(1.0) and seen[1] == pytest.approx(1e3 * (math.e - 1) / 2)


def test_rollouts_use_the_configured_sampling(tmp_path, monkeypatch):
    model, tok, task, examples, config = _paper(top_p=0.9, top_k=5, temperature=0.7, steps=1)
    _coin_rewards(monkeypatch, task)
    calls = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(k) or real_generate(*a, **k))
    identify(model, tok, task, examples, config, tmp_path)
    assert calls and all((c["top_p"], c["top_k"], c["temperature"]) == (0.9, 5, 0.7) for c in calls)


def test_curriculum_solved_keeps_always_solved_problems(tmp_path, monkeypatch):
    model, tok, task, examples, _ = _setup()
    args = _solved_per_problem(monkeypatch, task, examples, (1, 3, 0, 2), tmp_path)
    assert select_problems(model, tok, task, examples, keep="solved", **args) == [examples[0], examples[1], examples[3]]
    assert select_problems(model, tok, task, examples, keep="band", **args) == [examples[0], examples[3]]
    with pytest.raises(ValueError, match="keep must be one of reliable, solved, band"):
        select_problems(model, tok, task, examples, keep="all", **args)


def test_identify_pipeline_runs_what_the_cli_runs_from_python(tmp_path, monkeypatch):
    """Held-out split, curriculum, training and sanity check in one call; progress lines to `say`, advice to `warn`."""
    from rlkv.identify import identify_pipeline

    model, tok, task, _, config = _setup(steps=1, samples_per_problem=2, min_pass=0.5)
    monkeypatch.setattr(task, "grade_many", lambda exs, texts: [float(i % 2) for i in range(len(exs))])
    lines, advice = [], []
    run = identify_pipeline(
        model,
        "arith",
        config,
        tmp_path,
        tokenizer=tok,
        limit=4,
        check_limit=2,
        check_sparsities=(0.5,),
        check_max_new_tokens=4,
        say=lines.append,
        warn=advice.append,
    )
    assert run.heads.shape == (2, 2) and run.candidates == 4 and len(run.problems) == 4 and run.rank == 0
    assert lines[0] == "tau 0.55, beta 0.001 (qwen2); rewards by the authors rule"
    assert (
        lines[1] == "curriculum: 4/4 problems solved in at least 50% of 2 samples"
        and f"wrote {tmp_path / 'heads.json'}" in lines
    )
    assert "| rlkv | 0.5 |" in lines[-1] and {r["n"] for r in run.check.rows} == {2}
    trained = {e.id for e in task.load(seed=0)[:-2]}
    assert not {s["id"] for s in run.check.samples} & trained  # held out: never trained on
    assert advice and advice[0].startswith("the sparsity penalty acted in 0 of 1 steps")
    with pytest.raises(ValueError, match="a loaded model needs its tokenizer"):
        identify_pipeline(model, "arith", config, tmp_path, limit=4)
    with pytest.raises(ValueError, match="--check-limit 9999 leaves no training problems"):
        identify_pipeline(model, "arith", config, tmp_path, tokenizer=tok, check_limit=9999)


def test_report_of_an_identification_run_says_whether_the_penalty_acted(tmp_path):
    """`rlkv report` on an identify run directory: training.md and training.png from log.jsonl."""
    from typer.testing import CliRunner

    from rlkv.cli import app

    records = [
        dict(step=s, mean_reward=r, penalty_weight=w, tau=0.55, mean_response_tokens=300.0, max_response_tokens=900,
             capped_rollouts=c, alpha_mean=0.9, alpha_std=0.05, alpha_min=0.7, alpha_max=1.0,
             frac_alpha_below_half=0.0, rollout_s=10.0, update_s=5.0, peak_gib=40.0)
        for s, r, w, c in ((1, 0.5, 0.0, 1), (2, 0.7, 1e-3, 0), (3, 0.6, 1e-3, 2), (4, 0.4, 0.0, 0))
    ]  # fmt: skip
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "training.md").read_text()
    assert "penalty acted in **2 of 4 steps (50%)** (tau 0.55)" in text
    assert "3 rollouts hit the length cap; the longest was 900 tokens" in text and "peak GPU memory 40.0 GiB" in text
    assert (tmp_path / "training.png").stat().st_size > 10_000
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.jsonl").write_text("")
    result = CliRunner().invoke(app, ["report", str(empty)])
    assert result.exit_code != 0 and "holds no steps yet" in result.output
