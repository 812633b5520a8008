"""GSPO / GRPO (task 'grpo'): rollout, rewards, group advantages, the clipped importance-sampling loss, metrics.

For each data batch (micro_batch_size prompts) the task's micro_batches():
  1. rolls out once, with the full model in eval mode (no dropout; ZeRO-3 gathers it) under no_grad: group_size
     completions per prompt in one left-padded batch with the KV cache, each stopping at its </s>. The prompt already
     ends with <assistant>, so the completion starts with the model's answer. The same weights then score the sampled
     tokens (old_logps) and, when beta > 0, so does the frozen reference, all at the sampling temperature (log-probs
     of softmax(logits / temperature), as TRL and verl score them). The rewards are computed once here.
  2. turns rewards into group advantages A_i = (r_i - mean_group) / (std_group + eps).
  3. yields grpo_steps updates on this one rollout (each update is grad_accum_steps micro-batches, the rollout split by
     group), so updates_per_batch = grpo_steps * grad_accum_steps and the lr schedule counts every inner update.

Loss (training.md 6.3), with m the completion mask (tokens up to and including </s>) and rho = logp - old_logp:
    seq (GSPO):  s_i = exp(sum_t m rho / sum_t m), one ratio per completion (the gradient reaches every token)
    token (GRPO): s_it = exp(rho_it)
    l_it = -min(s A_i, clip(s, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_it,  KL = exp(ref - logp) - (ref - logp) - 1
    grpo: mean_i (sum_t m l / sum_t m)    bnpo: sum m l / sum m    dr_grpo: sum m l / (completions * max_new_tokens)
    total = that + aux_loss_coef * MoE aux loss.
Each rank normalises its own rollout by its own denominator, and the ranks' gradients are averaged equally (not
weighted by tokens across ranks, unlike pretraining and SFT).
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
import torch.nn.functional as F

from model import batch_generate, left_pad
from trainer.config import GRPOConfig
from trainer.data import IGNORE_INDEX
from trainer.rewards import RewardFn, Sample, exact_match_reward, resolve_reward
from trainer.tasks import LossOutput, Task, frozen_reference_model, policy_autocast

LEVELS = ("seq", "token")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


# ----------------------------------------------------------------------------------------------------------------------
# The math, on plain tensors

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (N,) in groups of group_size consecutive completions -> (advantages (N,), zero-std groups (N/G,) bool).

    Normalised with the population std (N, not N - 1): the group's advantages then have exactly mean 0 and variance 1
    whatever G is; it is the spread of these G samples we standardise, not an estimate of the prompt's reward
    variance. (The original used N - 1, which shrinks advantages by sqrt((G-1)/G), e.g. 0.71 for G = 2.)
    Groups whose rewards are all equal carry no signal: their advantages are exactly 0."""
    groups = rewards.float().view(-1, group_size)
    zero_std = groups.amax(dim=1) == groups.amin(dim=1)
    advantages = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    return advantages.masked_fill(zero_std[:, None], 0.0).reshape(-1), zero_std


def importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """(N, L) ratios pi/pi_old: per token ('token', GRPO) or the completion's geometric mean broadcast ('seq', GSPO)."""
    log_ratio = logps - old_logps
    if level == "seq":
        log_ratio = ((log_ratio * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).unsqueeze(-1).expand_as(logps)
    elif level != "token":
        raise ValueError(f"importance_sampling_level must be one of {LEVELS}, got {level!r}")
    return log_ratio.exp()


def clipped_policy_loss(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """-min(s A, clip(s, 1 - eps_low, 1 + eps_high) A) per token: ratio (N, L), advantages (N,) -> (N, L)."""
    a = advantages.unsqueeze(-1)
    return -torch.min(ratio * a, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1 with d = ref - logp (>= 0)."""
    d = ref_logps - logps
    return d.exp() - d - 1.0


def loss_numerator(token_loss: torch.Tensor, mask: torch.Tensor, row_weight: torch.Tensor,
                   loss_type: str) -> torch.Tensor:
    """The rows' share of the aggregated loss before normalisation: grpo sums each row's token mean, bnpo and dr_grpo
    sum all tokens. row_weight (N,) is 0 for completions left out (skipped zero-std groups), else 1."""
    per_row = (token_loss * mask).sum(dim=-1)
    if loss_type == "grpo":
        per_row = per_row / mask.sum(dim=-1).clamp(min=1)
    elif loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return (per_row * row_weight).sum()


def loss_denominator(mask: torch.Tensor, row_weight: torch.Tensor, loss_type: str, max_new_tokens: int) -> float:
    """grpo: completions counted; bnpo: their tokens; dr_grpo: all completions x max_new_tokens (a constant)."""
    if loss_type == "grpo":
        return max(1.0, float(row_weight.sum()))
    if loss_type == "bnpo":
        return max(1.0, float((mask * row_weight.unsqueeze(-1)).sum()))
    if loss_type == "dr_grpo":
        return float(mask.shape[0] * max_new_tokens)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int,
              row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar loss of a whole rollout (see the module docstring)."""
    row_weight = torch.ones(mask.shape[0], device=mask.device) if row_weight is None else row_weight
    return (loss_numerator(token_loss, mask, row_weight, loss_type)
            / loss_denominator(mask, row_weight, loss_type, max_new_tokens))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def rollout_sequences(prompts: list[list[int]], completions: torch.Tensor, eos_id: int, pad_id: int) -> dict:
    """[left-padded prompt | completion] rows for scoring. The completion mask keeps each row's tokens up to and
    including its first </s> (a sampled <pad> is a real token; what follows </s> is filler); position ids count real
    tokens only, so left padding does not shift them."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, completions.device)
    is_eos = completions == eos_id
    completion_mask = (is_eos.long().cumsum(dim=-1) - is_eos.long()) == 0
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    return {"input_ids": torch.cat([prompt_ids, completions], dim=1), "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(dim=-1) - 1).clamp(min=0), "completion_ids": completions,
            "completion_mask": completion_mask.float(), "truncated": ~is_eos.any(dim=-1)}


def completion_forward(forward, batch: dict, temperature: float = 1.0,
                       with_entropy: bool = False) -> tuple[dict, torch.Tensor]:
    """One forward over [prompt | completion] -> (model output, log-probs (N, L) fp32 of the completion tokens) under
    softmax(logits / temperature), the distribution the rollout sampled from (top-k/top-p truncation aside, as in TRL
    and verl): scored at another temperature, the loss would push a different policy than the one that was sampled.
    The output's 'entropy' (N, L), when asked for, is that of each completion position's distribution."""
    completion_ids = batch["completion_ids"]
    targets = F.pad(completion_ids, (0, 1), value=IGNORE_INDEX)  # the last position predicts past the completion
    out = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], logits_to_keep=completion_ids.shape[1] + 1, targets=targets,
                  return_entropy=with_entropy, temperature=temperature)
    if with_entropy:
        out["entropy"] = out["entropy"][:, :-1]
    return out, out["target_log_probs"][:, :-1]


# ----------------------------------------------------------------------------------------------------------------------
# The task

class GRPOTask(Task):
    kind = "grpo"
    eval_loss_metric = None  # held-out quality is the reward of greedy completions (eval_reward), not a loss

    def __init__(self, config, tokenizer, data_files, reward_fn: RewardFn | None = None):
        super().__init__(config, tokenizer, data_files)
        self.grpo = g = config.grpo or GRPOConfig()
        if g.group_size < 2:
            raise ValueError(f"grpo.group_size must be >= 2 (advantages compare completions of one prompt), "
                             f"got {g.group_size}")
        if g.importance_sampling_level not in LEVELS:
            raise ValueError(f"grpo.importance_sampling_level must be one of {LEVELS}, "
                             f"got {g.importance_sampling_level!r}")
        if g.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type must be one of {LOSS_TYPES}, got {g.loss_type!r}")
        if g.grpo_steps < 1 or g.temperature <= 0 or g.clip_eps_low < 0 or g.clip_eps_high < 0 or g.beta < 0:
            raise ValueError(f"grpo needs grpo_steps >= 1, temperature > 0 (the group's completions must differ) and "
                             f"non-negative clip_eps_low/high and beta, got {g}")
        if config.micro_batch_size % config.grad_accum_steps:
            raise ValueError(f"grpo splits each rollout of micro_batch_size={config.micro_batch_size} prompts into "
                             f"grad_accum_steps={config.grad_accum_steps} micro-batches: make it a multiple")
        self.reward_fn = reward_fn or resolve_reward(g.reward)
        self.updates_per_batch = g.grpo_steps * config.grad_accum_steps
        self._reference = None  # built on first use when beta > 0

    def _load(self, path, split, eval_fraction):
        dataset = super()._load(path, split, eval_fraction)
        longest = int(dataset.prompts.lengths()[list(dataset.items)].max()) + 1 if len(dataset) else 0  # + <assistant>
        limit = self.config.data.max_seq_len - self.grpo.max_new_tokens
        if longest > limit:
            raise ValueError(f"{path} ({split}): a prompt has {longest} tokens, more than data.max_seq_len - "
                             f"grpo.max_new_tokens = {limit}: raise max_seq_len, lower max_new_tokens or drop "
                             f"long prompts")
        return dataset

    # --- rollout ---
    def _samples(self, prompts: list[list[int]], seqs: dict, answers: list[str]) -> list[Sample]:
        decode = self.tokenizer.decode
        prompt_text = {}
        samples = []
        for prompt, ids, mask, truncated, answer in zip(prompts, seqs["completion_ids"].tolist(),
                                                        seqs["completion_mask"].bool().tolist(),
                                                        seqs["truncated"].tolist(), answers):
            key = tuple(prompt)
            if key not in prompt_text:
                prompt_text[key] = decode(prompt)
            completion = decode([t for t, keep in zip(ids, mask) if keep])
            samples.append(Sample(prompt_text[key], completion, answer, truncated))
        return samples

    def _rewards(self, samples: list[Sample], device) -> torch.Tensor:
        rewards = self.reward_fn(samples)
        if len(rewards) != len(samples):
            raise ValueError(f"reward function {self.grpo.reward!r} returned {len(rewards)} rewards for "
                             f"{len(samples)} completions")
        rewards = torch.tensor([float(r) for r in rewards], device=device)
        if not torch.isfinite(rewards).all():
            raise ValueError(f"reward function {self.grpo.reward!r} returned a non-finite reward: {rewards.tolist()}")
        return rewards

    def _generate(self, backend, prompts: list[list[int]], temperature: float | None, score: bool):
        """Completions of prompts as rollout_sequences, their log-probs under the same weights when score, and the
        seconds spent generating."""
        g, tok = self.grpo, self.tokenizer
        with backend.generation_model() as model, policy_autocast(backend):
            start = time.perf_counter()
            completions = batch_generate(model, prompts, max_new_tokens=g.max_new_tokens, pad_token_id=tok.pad_id,
                                         stop_token_ids=[tok.eos_id], temperature=temperature, top_k=g.top_k,
                                         top_p=g.top_p)
            seconds = time.perf_counter() - start
            seqs = rollout_sequences(prompts, completions, tok.eos_id, tok.pad_id)
            old_logps = completion_forward(model, seqs, g.temperature)[1] if score else None
        return seqs, old_logps, seconds

    @torch.no_grad()
    def rollout(self, prompts: list[torch.Tensor], answers: list[str], backend) -> dict:
        """Sample, score and reward group_size completions per prompt: one dict of (N, ...) tensors, N = prompts x G."""
        g = self.grpo
        rows = [p.tolist() for p in prompts for _ in range(g.group_size)]
        seqs, old_logps, seconds = self._generate(backend, rows, g.temperature, score=True)
        seqs["old_logps"] = old_logps
        if g.beta > 0:
            if self._reference is None:
                self._reference = frozen_reference_model(self.config, backend)
            with policy_autocast(backend):
                seqs["ref_logps"] = completion_forward(self._reference, seqs, g.temperature)[1]
        rewards = self._rewards(self._samples(rows, seqs, [a for a in answers for _ in range(g.group_size)]),
                                backend.device)
        seqs["advantages"], zero_std = group_advantages(rewards, g.group_size, g.advantage_eps)
        skip = zero_std.repeat_interleave(g.group_size) & g.skip_zero_std_groups
        seqs["row_weight"] = (~skip).float()
        lengths = seqs["completion_mask"].sum(dim=-1)
        seqs["rollout_metrics"] = {
            "reward_mean": rewards.mean(), "reward_std": rewards.std(unbiased=False),
            "zero_std_group_share": zero_std.float().mean(), "completion_len": lengths.mean(),
            "truncated_share": seqs["truncated"].float().mean(),
            "gen_tokens_per_s": lengths.sum() / max(seconds, 1e-9)}
        # Chunks of the rollout are normalised by the whole rollout's denominator (x chunks, as the backend divides
        # each micro-batch's loss by grad_accum_steps): the accumulated gradient is that of the one-batch formula.
        denominator = loss_denominator(seqs["completion_mask"], seqs["row_weight"], g.loss_type, g.max_new_tokens)
        seqs["loss_scale"] = self.config.grad_accum_steps / denominator
        return seqs

    def micro_batches(self, batch: dict, backend) -> Iterator[dict]:
        rollout = self.rollout(batch["prompts"], batch["answers"], backend)
        rows = rollout["input_ids"].shape[0] // self.config.grad_accum_steps  # whole groups (checked in __init__)
        chunks = [{k: v[i:i + rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in rollout.items()}
                  for i in range(0, rollout["input_ids"].shape[0], rows)]
        for _ in range(self.grpo.grpo_steps):
            yield from chunks

    # --- loss ---
    def loss(self, forward, batch: dict) -> LossOutput:
        g = self.grpo
        out, logps = completion_forward(forward, batch, g.temperature, with_entropy=True)
        mask, advantages = batch["completion_mask"], batch["advantages"]
        ratio = importance_ratio(logps, batch["old_logps"], mask, g.importance_sampling_level)
        token_loss = clipped_policy_loss(ratio, advantages, g.clip_eps_low, g.clip_eps_high)
        metrics = {}
        if g.beta > 0:
            kl = k3_kl(logps, batch["ref_logps"])
            token_loss = token_loss + g.beta * kl
            metrics["kl"] = masked_mean(kl.detach(), mask)
        policy_loss = loss_numerator(token_loss, mask, batch["row_weight"], g.loss_type) * batch["loss_scale"]
        aux = out.get("aux_loss")
        total = policy_loss + self.config.aux_loss_coef * aux if aux is not None else policy_loss
        with torch.no_grad():
            a = advantages.unsqueeze(-1)
            log_ratio = logps - batch["old_logps"]
            metrics |= {
                "policy_loss": policy_loss.detach(),
                "aux_loss": aux.detach() if aux is not None else torch.zeros((), device=total.device),
                "clip_low": masked_mean(((ratio < 1 - g.clip_eps_low) & (a < 0)).float(), mask),
                "clip_high": masked_mean(((ratio > 1 + g.clip_eps_high) & (a > 0)).float(), mask),
                "approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask),  # k3 of KL(old || current)
                "entropy": masked_mean(out["entropy"], mask),
                **batch["rollout_metrics"]}
        return LossOutput(total, metrics, int(batch["attention_mask"].sum()))

    # --- eval: reward of greedy completions on held-out prompts ---
    def eval_metrics(self, batch: dict, backend) -> dict[str, torch.Tensor]:
        rows = [p.tolist() for p in batch["prompts"]]
        seqs, _, _ = self._generate(backend, rows, temperature=None, score=False)
        samples = self._samples(rows, seqs, batch["answers"])
        return {"reward": self._rewards(samples, backend.device).mean(),
                "exact_match": torch.tensor(exact_match_reward(samples)).mean(),
                "completion_len": seqs["completion_mask"].sum(dim=-1).mean(),
                "truncated_share": seqs["truncated"].float().mean()}
