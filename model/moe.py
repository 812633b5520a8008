"""Mixture-of-experts feed-forward block: fp32 softmax router, top-k routed SwiGLU experts, always-on shared expert."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .mlp import MLP


class Router(nn.Module):
    """The gate: a bare (E, H) weight (not an nn.Linear, so it keeps its kaiming-uniform init)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, H) -> softmax scores over all experts (N, E), always computed in fp32 (autocast off)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        return logits.softmax(dim=-1, dtype=torch.float32)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe_config
        self.top_k = moe.num_experts_per_tok
        self.num_experts = moe.n_routed_experts
        self.norm_topk_prob = moe.norm_topk_prob
        self.routed_scaling_factor = moe.routed_scaling_factor
        self.seq_aux = moe.seq_aux
        self.experts = nn.ModuleList(MLP(config.hidden_size, moe.intermediate_size) for _ in range(moe.n_routed_experts))
        self.gate = Router(config.hidden_size, moe.n_routed_experts)
        self.shared_experts = (
            MLP(config.hidden_size, moe.intermediate_size * moe.n_shared_experts) if moe.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, H) -> (output (B, T, H), aux loss (0-d fp32) in training mode else None)."""
        batch, seq_len, hidden = x.shape
        flat = x.reshape(-1, hidden)
        scores = self.gate(flat)
        weights, expert_idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor

        routed = self._run_experts(flat, expert_idx)  # (N, K, H) in the experts' output dtype
        # Weighted sum in fp32 (the weights are fp32), then back to the experts' dtype: well defined under autocast too
        out = (routed.float() * weights.unsqueeze(-1)).sum(dim=1).to(routed.dtype)
        out = out.view(batch, seq_len, hidden)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux_loss = self._aux_loss(scores, expert_idx, batch, seq_len) if self.training else None
        return out, aux_loss

    def _run_experts(self, flat: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """Sort the N*K (token, expert) assignments by expert, run each expert once on its contiguous slice, unsort."""
        num_tokens, top_k = expert_idx.shape
        # With autograd on, or with DeepSpeed ZeRO-3 partitioned parameters (they carry `ds_id`), every expert is called,
        # even on zero rows: ZeRO-3 gathers each expert's parameters collectively, so all ranks must make the same calls
        # or they hang, and DDP expects a gradient for every parameter. Otherwise (plain inference) empty experts are
        # skipped, which matters when decoding one token at a time.
        call_every_expert = torch.is_grad_enabled() or hasattr(self.gate.weight, "ds_id")
        if num_tokens == 1 and not call_every_expert:  # one-row decoding: just the K chosen experts, nothing to sort
            return torch.cat([self.experts[e](flat) for e in expert_idx[0].tolist()]).view(1, top_k, -1)
        assignments = expert_idx.reshape(-1)
        order = assignments.argsort(stable=True)
        counts = torch.bincount(assignments, minlength=self.num_experts).tolist()
        tokens = flat.index_select(0, order // top_k)
        outputs = [
            expert(chunk)
            for expert, chunk, count in zip(self.experts, tokens.split(counts), counts)
            if count or call_every_expert
        ]
        sorted_out = torch.cat(outputs)
        unsorted = sorted_out.new_empty(sorted_out.shape).index_copy_(0, order, sorted_out)
        return unsorted.view(num_tokens, top_k, -1)

    def _aux_loss(self, scores: torch.Tensor, expert_idx: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
        """Load-balancing loss sum_e f_e * P_e: f = routed share x E (no gradient), P = mean router probability.

        Unscaled (the trainer applies its coefficient); padding tokens count, as in the reference."""
        num_experts, top_k = self.num_experts, self.top_k
        if self.seq_aux:  # per sequence, then averaged over the batch
            counts = scores.new_zeros(batch, num_experts).scatter_add_(
                1, expert_idx.view(batch, -1), scores.new_ones(batch, seq_len * top_k)
            )
            load = counts.div_(seq_len * top_k / num_experts)
            importance = scores.view(batch, seq_len, num_experts).mean(dim=1)
            return (load * importance).sum(dim=1).mean()
        load = F.one_hot(expert_idx.reshape(-1), num_classes=num_experts).float().mean(0) * num_experts
        return (scores.mean(0) * load).sum()
