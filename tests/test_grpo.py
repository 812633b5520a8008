"""GSPO/GRPO: the loss pieces against hand-computed values, the rollout's sequences, the Cortex reward, and short
end-to-end runs of the stage (one device and DeepSpeed ZeRO-3 in-process)."""
import faulthandler
import math
import socket
from dataclasses import replace

import pytest
import torch

import utils
from model import CortexModel, save_weights, tiny_config
from trainer.cli import build_task, get_tokenizer
from trainer.config import DeepSpeedConfig, OptimConfig
from trainer.grpo import (GRPOTask, aggregate, clipped_policy_loss, completion_forward, group_advantages,
                          importance_ratio, k3_kl, loss_denominator, loss_numerator, rollout_sequences)
from trainer.loop import Trainer, run_stage
from trainer.metrics import read_metrics
from trainer.rewards import (REWARDS, TRUNCATED_FACTOR, Sample, cortex_reward, cortex_score, exact_match_reward,
                             resolve_reward)


# ---------------------------------------------------------------------------------------------------------------------
# advantages, ratios, clipping, KL, aggregation

def test_group_advantages_use_the_population_std_and_flag_zero_std_groups():
    adv, zero = group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), group_size=2, eps=1e-4)
    assert adv.tolist() == pytest.approx([-1 / (1 + 1e-4), 1 / (1 + 1e-4), 0.0, 0.0])
    assert zero.tolist() == [False, True]
    adv, zero = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), group_size=4, eps=0.0)
    std = math.sqrt(3 / 16)  # population std of (0, 0, 0, 1)
    assert adv.tolist() == pytest.approx([-0.25 / std] * 3 + [0.75 / std], rel=1e-5)
    # all-equal rewards that do not sum exactly in floating point still give exactly zero advantages
    adv, zero = group_advantages(torch.full((8,), 0.1), group_size=8, eps=1e-4)
    assert zero.tolist() == [True] and adv.abs().max() == 0


LOGPS = torch.tensor([[-1.0, -2.0, -3.0]])
OLD = torch.tensor([[-1.1, -2.0, -2.8]])      # log ratios 0.1, 0, -0.2
MASK = torch.tensor([[1.0, 1.0, 0.0]])        # the third token is padding


def test_gspo_sequence_ratio_is_the_masked_geometric_mean_and_is_clipped_two_sided():
    ratio = importance_ratio(LOGPS, OLD, MASK, "seq")
    assert ratio.tolist()[0] == pytest.approx([math.exp(0.05)] * 3)   # (0.1 + 0) / 2 real tokens
    up = clipped_policy_loss(ratio, torch.tensor([1.0]), eps_low=0.2, eps_high=0.02)
    assert up[0, 0].item() == pytest.approx(-1.02)                      # A > 0: the ratio is capped at 1 + eps_high
    down = clipped_policy_loss(ratio, torch.tensor([-1.0]), eps_low=0.2, eps_high=0.02)
    assert down[0, 0].item() == pytest.approx(math.exp(0.05))          # A < 0: min picks the unclipped term
    low = clipped_policy_loss(torch.tensor([[0.5]]), torch.tensor([-2.0]), eps_low=0.2, eps_high=0.02)
    assert low.item() == pytest.approx(0.8 * 2)                         # A < 0 and s < 1 - eps_low: capped at 0.8

    # the gradient of the one sequence ratio reaches every real token equally, and no padding token
    logps = LOGPS.clone().requires_grad_(True)
    loss = clipped_policy_loss(importance_ratio(logps, OLD, MASK, "seq"), torch.tensor([-1.0]), 0.2, 0.02)
    aggregate(loss, MASK, "grpo", max_new_tokens=3).backward()
    assert logps.grad.tolist()[0] == pytest.approx([math.exp(0.05) / 2, math.exp(0.05) / 2, 0.0])
    # clipped side: no gradient at all
    logps.grad = None
    loss = clipped_policy_loss(importance_ratio(logps, OLD, MASK, "seq"), torch.tensor([1.0]), 0.2, 0.02)
    aggregate(loss, MASK, "grpo", max_new_tokens=3).backward()
    assert logps.grad.abs().max() == 0


def test_on_policy_gspo_gradient_is_the_advantage_weighted_mean_log_prob_gradient():
    """One update per rollout: the ratio is exactly 1, clipping is inactive, and d loss / d logp_it = -A_i m_it / (n_i N)
    (grpo aggregation): good completions made more likely, bad ones less, prompt and padding untouched."""
    logps = torch.randn(3, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    advantages = torch.tensor([1.5, -0.5, -1.0])
    ratio = importance_ratio(logps, logps.detach(), mask, "seq")
    assert torch.equal(ratio, torch.ones_like(ratio))
    aggregate(clipped_policy_loss(ratio, advantages, 3e-4, 4e-4), mask, "grpo", max_new_tokens=4).backward()
    expected = -advantages[:, None] * mask / mask.sum(-1, keepdim=True) / 3
    assert torch.allclose(logps.grad, expected)


def test_grpo_token_ratio_and_clipping_per_token():
    ratio = importance_ratio(LOGPS, OLD, MASK, "token")
    assert ratio.tolist()[0] == pytest.approx([math.exp(0.1), 1.0, math.exp(-0.2)])
    loss = clipped_policy_loss(ratio, torch.tensor([2.0]), eps_low=0.1, eps_high=0.05)
    # A > 0: min(s A, clip(s) A): e^0.1 = 1.105 -> 1.05; 1 -> 1; e^-0.2 = 0.819 stays (clip would raise it to 0.9)
    assert loss.tolist()[0] == pytest.approx([-2 * 1.05, -2.0, -2 * math.exp(-0.2)])
    with pytest.raises(ValueError, match="importance_sampling_level"):
        importance_ratio(LOGPS, OLD, MASK, "sentence")


def test_k3_kl_matches_the_formula_and_is_zero_at_the_reference():
    kl = k3_kl(torch.tensor([-1.0, -2.0, -0.3]), torch.tensor([-1.5, -2.0, 0.0]))
    expected = [math.exp(d) - d - 1 for d in (-0.5, 0.0, 0.3)]
    assert kl.tolist() == pytest.approx(expected)
    assert kl[1] == 0 and (kl >= 0).all()


def test_the_three_aggregations_and_chunking():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert aggregate(token_loss, mask, "grpo", 4).item() == pytest.approx((1.5 + 5.0) / 2)   # mean of row means
    assert aggregate(token_loss, mask, "bnpo", 4).item() == pytest.approx(18 / 5)             # token mean
    assert aggregate(token_loss, mask, "dr_grpo", 4).item() == pytest.approx(18 / (2 * 4))    # / (rows x max_new)
    skip_first = torch.tensor([0.0, 1.0])
    assert aggregate(token_loss, mask, "grpo", 4, skip_first).item() == pytest.approx(5.0)
    assert aggregate(token_loss, mask, "bnpo", 4, skip_first).item() == pytest.approx(15 / 3)
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(token_loss, mask, "mean", 4)
    # a rollout split into micro-batches (each normalised by the whole rollout) sums to the one-batch loss
    weight = torch.ones(2)
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        denominator = loss_denominator(mask, weight, loss_type, 4)
        parts = sum(loss_numerator(token_loss[i:i + 1], mask[i:i + 1], weight[i:i + 1], loss_type) / denominator
                    for i in range(2))
        assert parts.item() == pytest.approx(aggregate(token_loss, mask, loss_type, 4).item())


# ---------------------------------------------------------------------------------------------------------------------
# rollout sequences: masks, truncation and left-padded positions

def test_rollout_sequences_mask_truncation_and_left_padded_scoring_match_unpadded():
    eos, pad = 2, 1
    completions = torch.tensor([[9, eos, pad, pad], [10, pad, 11, 12]])  # row 2 sampled a <pad> and never stopped
    seqs = rollout_sequences([[3, 4, 5, 6], [7, 8]], completions, eos, pad)
    assert seqs["completion_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert seqs["truncated"].tolist() == [False, True]
    assert seqs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 5, 5], [0, 0, 0, 1, 2, 3, 4, 5]]

    torch.manual_seed(0)
    model = CortexModel(tiny_config(64)).eval()
    for temperature in (1.0, 0.7):  # scored under the distribution the rollout sampled from: softmax(logits / T)
        out, logps = completion_forward(model, seqs, temperature, with_entropy=True)
        for row, prompt in enumerate([[3, 4, 5, 6], [7, 8]]):
            n = int(seqs["completion_mask"][row].sum())
            ids = torch.tensor([prompt + completions[row, :n].tolist()])
            logits = model(ids)["logits"][0, len(prompt) - 1:-1].float() / temperature
            alone = logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
            assert torch.allclose(logps[row, :n], alone, atol=1e-5), (temperature, row)
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            assert torch.allclose(out["entropy"][row, :n], entropy, atol=1e-4), (temperature, row)


def test_one_update_makes_the_better_completion_more_likely_and_the_worse_less():
    seqs = rollout_sequences([[3, 4, 5], [3, 4, 5]], torch.tensor([[9, 10, 2], [11, 12, 2]]), eos_id=2, pad_id=1)
    mask = seqs["completion_mask"]
    advantages, _ = group_advantages(torch.tensor([1.0, 0.0]), group_size=2, eps=1e-4)  # (+1, -1)
    for level in ("seq", "token"):
        torch.manual_seed(0)
        model = CortexModel(tiny_config(64))
        with torch.no_grad():
            before = (completion_forward(model, seqs)[1] * mask).sum(-1)
        logps = completion_forward(model, seqs)[1]
        loss = clipped_policy_loss(importance_ratio(logps, logps.detach(), mask, level), advantages, 3e-4, 4e-4)
        aggregate(loss, mask, "grpo", max_new_tokens=3).backward()
        torch.optim.SGD(model.parameters(), lr=0.05).step()
        with torch.no_grad():
            after = (completion_forward(model, seqs)[1] * mask).sum(-1)
        assert after[0] > before[0] and after[1] < before[1], level


# ---------------------------------------------------------------------------------------------------------------------
# the Cortex reward

def _sample(completion, answer="42", truncated=False):
    return Sample("<system> </s><user>q</s><assistant>", completion, answer, truncated)


def test_cortex_reward_values():
    long_think = "x" * 500
    perfect = _sample(f"<think>{long_think}</think><answer>The answer is 42.</answer></s>")
    assert cortex_score(perfect) == pytest.approx(11.0)
    # the number in the reasoning does not count: the answer part says 40
    leak = _sample("<think>42</think><answer>The answer is 40.</answer></s>")
    assert cortex_score(leak) == pytest.approx(7 * math.exp(-0.2) + 2 * math.log(3) / math.log(501) + 1)
    # finished but not well-formed (no answer block; the think block left open): the truncated share of the reward
    no_answer = 2 * math.log(6) / math.log(501)
    assert cortex_score(_sample("<think>so 42</think></s>")) == pytest.approx(no_answer * TRUNCATED_FACTOR)
    unclosed = _sample("<think>so<answer>42</answer></s>")
    assert cortex_score(unclosed) == pytest.approx((7 + 1) * TRUNCATED_FACTOR)
    assert cortex_score(_sample("42")) == 0.0
    decimal = _sample("<think>a</think><answer>答案是3.5。</answer></s>", answer="3.5")
    assert cortex_score(decimal) == pytest.approx(7 + 2 * math.log(2) / math.log(501) + 1 + 1)
    negative = _sample("<think>a</think><answer>-3</answer></s>", answer="3")
    assert cortex_score(negative) == pytest.approx(7 * math.exp(-0.6) + 2 * math.log(2) / math.log(501) + 1)
    # cut off without </s>: no full credit
    cut = _sample(f"<think>{long_think}</think><answer>The answer is 42.</answer> and then", truncated=True)
    assert cortex_score(cut) == pytest.approx(11.0 * TRUNCATED_FACTOR)
    assert cortex_reward([perfect, leak]) == [cortex_score(perfect), cortex_score(leak)]
    assert exact_match_reward([perfect, leak, cut]) == [1.0, 0.0, 0.0]


def test_reward_functions_are_pluggable_by_name_or_import_path():
    assert resolve_reward("cortex") is REWARDS["cortex"]
    assert resolve_reward("trainer.rewards:exact_match_reward") is exact_match_reward
    with pytest.raises(ValueError, match="unknown reward 'v2'"):
        resolve_reward("v2")
    with pytest.raises(ValueError, match="no function 'nope'"):
        resolve_reward("trainer.rewards:nope")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("no_such_module_xyz:f")


# ---------------------------------------------------------------------------------------------------------------------
# end to end (tiny preset)

@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo_init") / "init.safetensors"
    torch.manual_seed(0)
    save_weights(CortexModel(utils.stage_config("grpo", preset="tiny").model), path)
    return path


def tiny_grpo(run_root, init, **changes):
    config = utils.stage_config("grpo", preset="tiny")
    grpo = replace(config.grpo, **{"max_new_tokens": 12, "group_size": 4, **changes.pop("grpo", {})})
    return replace(config, run_root=str(run_root), init_from=str(init), grpo=grpo, eval_every_steps=0,
                   micro_batch_size=4, data=replace(config.data, max_eval_batches=1), **changes)


class CountingReward:
    """The real Cortex reward, recording how many completions each call scored."""

    def __init__(self):
        self.calls = []

    def __call__(self, samples):
        self.calls.append(len(samples))
        return cortex_reward(samples)


def test_grpo_stage_runs_with_one_reward_call_per_rollout_and_inner_updates_in_the_schedule(tmp_path, init_weights):
    config = tiny_grpo(tmp_path, init_weights, max_steps=4, grpo={"grpo_steps": 2})  # the tiny preset does 1
    reward = CountingReward()

    def make_task(c):
        return GRPOTask(c, get_tokenizer(c.tokenizer), utils.data_files(c), reward_fn=reward)

    trainer = Trainer(config, make_task)
    train_prompts = len(trainer.task.train_dataset(0))
    assert trainer.count_steps() == (train_prompts // 4 * config.grpo.grpo_steps, True)  # every inner update a step
    out = trainer.train()
    trainer.backend.close()

    rollout_size = 4 * config.grpo.group_size
    assert reward.calls.count(rollout_size) == 2                    # 4 steps = 2 rollouts x 2 updates, scored once each
    steps = read_metrics(out / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for key in ("reward_mean", "reward_std", "zero_std_group_share", "completion_len", "truncated_share", "clip_low",
                "clip_high", "approx_kl", "entropy", "gen_tokens_per_s", "policy_loss", "aux_loss", "lr"):
        assert all(math.isfinite(s[key]) for s in steps), key
    # the first update of each rollout sees the rollout's own weights: ratio exactly 1 (dropout off, same precision)
    for first in (steps[0], steps[2]):
        assert first["approx_kl"] == 0 and first["clip_low"] == 0 and first["clip_high"] == 0
    assert steps[1]["approx_kl"] > 0                                  # the second update moved away from them
    assert steps[0]["reward_mean"] == steps[1]["reward_mean"]         # rewards belong to the rollout
    assert 0 < steps[0]["completion_len"] <= 12
    evals = read_metrics(out / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 4]
    assert {"eval_reward", "eval_exact_match", "eval_completion_len", "eval_truncated_share"} <= set(evals[0])


def digit_share(samples):
    """A toy reward the random-init model can learn fast: the share of digits in the completion's text."""
    texts = [s.completion.removesuffix("</s>") for s in samples]
    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in texts]


def test_gspo_learns_a_toy_reward(tmp_path, init_weights):
    """The whole stage (rollout, advantages, GSPO loss, optimizer) raises a reward it can reach: from about 0.07 to
    above 0.5 within 25 updates (1.0 from update 19 on); with the advantage sign flipped it falls to 0."""
    lr = 2e-2  # a random-init model, one update per rollout: the ratio is 1, so the gradient is A * grad mean logp
    config = tiny_grpo(tmp_path, init_weights, max_steps=25, samples=False,
                       optim=OptimConfig(initial_lr=lr, max_lr=lr, min_lr=lr, weight_decay=0.0))
    trainer = Trainer(config, lambda c: GRPOTask(c, get_tokenizer(c.tokenizer), utils.data_files(c),
                                                 reward_fn=digit_share))
    out = trainer.train()
    trainer.backend.close()
    rewards = [s["reward_mean"] for s in read_metrics(out / "metrics.jsonl")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.15 and last > 0.5, rewards


def test_grpo_under_deepspeed_zero3_with_a_reference_model(tmp_path, init_weights, monkeypatch):
    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)  # removed again after the test, so later tests do not pick DeepSpeed
    # with a reference model (beta > 0), bnpo, and each rollout split into 2 accumulation micro-batches
    config = tiny_grpo(tmp_path, init_weights, max_steps=2, backend="deepspeed", grad_accum_steps=2,
                       deepspeed=DeepSpeedConfig(zero_stage=3), grpo={"beta": 0.1, "loss_type": "bnpo"})
    faulthandler.dump_traceback_later(240, exit=True)  # a hang (e.g. mismatched ZeRO-3 gathers) fails loudly
    try:
        out = run_stage(config, lambda c: build_task(c, utils.data_files(c)))
    finally:
        faulthandler.cancel_dump_traceback_later()
    steps = read_metrics(out / "metrics.jsonl")
    assert len(steps) == 2 and steps[0]["kl"] < 1e-7 < steps[1]["kl"]   # the policy leaves the frozen reference
    assert steps[0]["approx_kl"] < 1e-7
    assert (out / "model.safetensors").exists()


def test_bad_grpo_settings_are_clear_errors(tmp_path, init_weights):
    tokenizer = get_tokenizer("tiny")
    config = tiny_grpo(tmp_path, init_weights, grpo={"group_size": 1})
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOTask(config, tokenizer, utils.data_files(config))
    config = tiny_grpo(tmp_path, init_weights, grpo={"max_new_tokens": 250})
    with pytest.raises(ValueError, match="max_seq_len - grpo.max_new_tokens"):
        GRPOTask(config, tokenizer, utils.data_files(config)).train_dataset(0)
