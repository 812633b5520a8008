"""Mixture-of-experts feed-forward block: fp32 softmax router, top-k routed SwiGLU experts, an always-on shared expert."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .head import compute_dtype
from .mlp import MLP


class Router(nn.Module):
    """The gate: a bare (E, H) weight (not an nn.Linear, so it keeps its kaiming-uniform init)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, H) -> softmax scores over all experts (N, E), always in fp32."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float()).softmax(dim=-1)


class RoutedExperts(nn.Module):
    """The E routed SwiGLU experts as stacked weights gate_proj, up_proj (E, I, H), down_proj (E, H, I): one module for
    ZeRO-3 to gather, one grouped product; the state dict keeps the published keys (`{e}.gate_proj.weight`, ...)."""

    WEIGHTS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.init_weights(lambda weight: nn.init.kaiming_uniform_(weight, a=math.sqrt(5)))  # nn.Linear's default

    def init_weights(self, init) -> None:
        """Expert by expert, in the reference's order (a seeded model draws the reference's numbers)."""
        for expert in range(self.num_experts):
            for name in self.WEIGHTS:
                init(getattr(self, name)[expert])

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """x (N, H), expert_idx (N, K) -> (N, K, H); the (row, expert) pairs sorted by expert, one slice each."""
        experts = self._grouped if self._grouped_mm_fits(x) else self._looped
        return sorted_by_expert(x, expert_idx, self.num_experts, experts)

    def _grouped_mm_fits(self, rows: torch.Tensor) -> bool:
        # rows must be 16-byte aligned; on CUDA (bf16, sm90/100) one kernel with no host sync
        dtype = compute_dtype(rows)
        aligned = all(size * dtype.itemsize % 16 == 0 for size in self.down_proj.shape[1:])
        return hasattr(torch, "_grouped_mm") and rows.device.type in ("cpu", "cuda") and aligned

    def _grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(rows)  # cast here: autocast does not cover _grouped_mm
        ends = counts.cumsum(0).to(torch.int32)  # each expert's slice ends here (on the device: no host sync)
        rows = rows.to(dtype)
        gate, up, down = (getattr(self, name).to(dtype).transpose(1, 2) for name in self.WEIGHTS)
        hidden = F.silu(torch._grouped_mm(rows, gate, offs=ends)) * torch._grouped_mm(rows, up, offs=ends)
        return torch._grouped_mm(hidden, down, offs=ends)

    def _looped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        per_expert = (getattr(self, name).unbind(0) for name in self.WEIGHTS)
        return torch.cat([F.linear(F.silu(F.linear(chunk, gate)) * F.linear(chunk, up), down)
                          for chunk, gate, up, down in zip(rows.split(counts.tolist()), *per_expert)])

    def gathered(self, rows: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """Like forward, each row's expert weights picked by index: no data-dependent shapes (compiled decoding)."""
        num_rows, top_k = expert_idx.shape
        idx = expert_idx.reshape(-1)
        inputs = rows.repeat_interleave(top_k, dim=0).unsqueeze(-1)  # (N*K, H, 1)
        gate = torch.bmm(self.gate_proj[idx], inputs)
        up = torch.bmm(self.up_proj[idx], inputs)
        return torch.bmm(self.down_proj[idx], F.silu(gate) * up).view(num_rows, top_k, -1)

    def _holds_zero3_shards(self) -> bool:
        # ZeRO-3 placeholders outside a gather (ds_shape is the real shape); DeepSpeed's checkpoints go by name
        return hasattr(self.gate_proj, "ds_id") and tuple(self.gate_proj.shape) != tuple(self.gate_proj.ds_shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._holds_zero3_shards():
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for expert in range(self.num_experts):  # the published order: expert by expert
            for name in self.WEIGHTS:
                weight = getattr(self, name)[expert]
                destination[f"{prefix}{expert}.{name}.weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if not self._holds_zero3_shards():  # the published per-expert keys -> one stacked entry per weight
            for name in self.WEIGHTS:
                keys = [f"{prefix}{expert}.{name}.weight" for expert in range(self.num_experts)]
                if all(key in state_dict for key in keys) and len({state_dict[key].shape for key in keys}) == 1:
                    state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])
        super()._load_from_state_dict(state_dict, prefix, *args)


def sorted_by_expert(x: torch.Tensor, expert_idx: torch.Tensor, num_experts: int, experts) -> torch.Tensor:
    """x (N, H), expert_idx (N, K) -> (N, K, H): the (row, expert) pairs sorted by expert, experts(rows, counts) applied
    to them (expert e takes the e-th slice of counts[e] rows), the results put back in pair order."""
    num_rows, top_k = expert_idx.shape
    order = expert_idx.reshape(-1).argsort(stable=True)
    rows = x.index_select(0, order // top_k)
    out = experts(rows, torch.bincount(expert_idx.reshape(-1), minlength=num_experts))
    return out.new_empty(out.shape).index_copy(0, order, out).view(num_rows, top_k, -1)


def unstack_expert_weights(named_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names (`layers.1.mlp.experts.gate_proj`, stacked) -> the published state-dict keys
    (`layers.1.mlp.experts.{e}.gate_proj.weight`), for code that collects weights by parameter name (DeepSpeed)."""
    out = {}
    for name, tensor in named_tensors.items():
        module_path, _, weight_name = name.rpartition(".")
        if module_path.endswith("mlp.experts") and weight_name in RoutedExperts.WEIGHTS:
            for expert, weight in enumerate(tensor.unbind(0)):
                out[f"{module_path}.{expert}.{weight_name}.weight"] = weight
        else:
            out[name] = tensor
    return out


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe_config
        self.top_k = moe.num_experts_per_tok
        self.num_experts = moe.n_routed_experts
        self.norm_topk_prob = moe.norm_topk_prob
        self.routed_scaling_factor = moe.routed_scaling_factor
        self.seq_aux = moe.seq_aux
        self.experts = RoutedExperts(moe.n_routed_experts, config.hidden_size, moe.intermediate_size)
        self.gate = Router(config.hidden_size, moe.n_routed_experts)
        shared_size = moe.intermediate_size * moe.n_shared_experts
        self.shared_experts = MLP(config.hidden_size, shared_size) if shared_size else None

    def forward(self, x: torch.Tensor, gather_experts: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, H) -> (output, aux loss (0-d fp32) when training, else None); gather_experts: compiled decoding."""
        batch, seq_len, hidden = x.shape
        flat = x.reshape(-1, hidden)
        scores = self.gate(flat)
        weights, expert_idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        routed = self.experts.gathered(flat, expert_idx) if gather_experts else self.experts(flat, expert_idx)
        out = (routed.float() * weights.unsqueeze(-1)).sum(dim=1).to(routed.dtype)  # weighted in fp32
        out = out.view(batch, seq_len, hidden)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux_loss = self._aux_loss(scores, expert_idx, batch, seq_len) if self.training else None
        return out, aux_loss

    def _aux_loss(self, scores: torch.Tensor, expert_idx: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
        """sum_e f_e * P_e: f = routed share x E (no gradient), P = mean router probability. Unscaled; padding counts."""
        num_experts, top_k = self.num_experts, self.top_k
        if self.seq_aux:  # per sequence, then averaged over the batch
            counts = scores.new_zeros(batch, num_experts).scatter_add_(
                1, expert_idx.view(batch, -1), scores.new_ones(batch, seq_len * top_k))
            load = counts / (seq_len * top_k / num_experts)
            importance = scores.view(batch, seq_len, num_experts).mean(dim=1)
            return (load * importance).sum(dim=1).mean()
        load = F.one_hot(expert_idx.reshape(-1), num_classes=num_experts).float().mean(0) * num_experts
        return (scores.mean(0) * load).sum()
