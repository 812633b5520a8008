"""Mixture-of-experts feed-forward block: fp32 softmax router, top-k routed SwiGLU experts, always-on shared expert."""

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .head import matmul_dtype, mm_into
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


class _SortedExpertsSwiGLU(torch.autograd.Function):
    """tokens (N, H) sorted by expert, counts[e] rows for expert e, stacked weights -> each slice through its expert's
    SwiGLU (N, H), for training.

    Backward writes each expert's weight gradients straight into one stacked gradient per weight. Autograd over
    per-expert views (unbind) would stack E separate gradients instead: one more copy of every expert weight's gradient
    per layer (at Cortex's size, 3 x 25 MB per layer: half again the experts' time on a CPU). Saves only the
    tokens and the two projections (written in place per slice); the activation is recomputed."""

    @staticmethod
    def forward(ctx, tokens, gate, up, down, counts, compute_dtype):
        x = tokens.to(compute_dtype)
        intermediate = gate.shape[1]
        gate_outs = x.new_empty(len(x), intermediate)  # every slice's projections, kept for backward
        up_outs = x.new_empty(len(x), intermediate)
        out = x.new_empty(len(x), down.shape[1])
        for expert, rows in _used_rows(counts):
            torch.mm(x[rows], gate[expert].to(compute_dtype).t(), out=gate_outs[rows])
            torch.mm(x[rows], up[expert].to(compute_dtype).t(), out=up_outs[rows])
            torch.mm(F.silu(gate_outs[rows]) * up_outs[rows], down[expert].to(compute_dtype).t(), out=out[rows])
        ctx.save_for_backward(tokens, gate_outs, up_outs)
        # The Parameter objects, not saved tensors: under DeepSpeed ZeRO-3 their storage is released after forward
        # and gathered again before this module's backward, and backward must see that one.
        ctx.weights, ctx.counts, ctx.compute_dtype = (gate, up, down), counts, compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        tokens, gate_outs, up_outs = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad_tokens = torch.empty_like(tokens)
        grads = [torch.empty_like(weight) for weight in ctx.weights]
        for expert, count in enumerate(ctx.counts):
            if not count:  # no tokens: a zero gradient, as an unused nn.Linear in the sum of a loss would get
                for grad in grads:
                    grad[expert].zero_()
        for expert, rows in _used_rows(ctx.counts):
            gate, up, down = (weight[expert].to(dtype) for weight in ctx.weights)
            x, grad_y = tokens[rows].to(dtype), grad_out[rows].to(dtype)
            gate_out, up_out = gate_outs[rows], up_outs[rows]
            silu = F.silu(gate_out)
            mm_into(grads[2][expert], grad_y.t(), silu * up_out)
            grad_act = grad_y @ down
            grad_up = grad_act * silu
            grad_gate = torch.ops.aten.silu_backward(grad_act.mul_(up_out), gate_out)
            mm_into(grads[0][expert], grad_gate.t(), x)
            mm_into(grads[1][expert], grad_up.t(), x)
            if grad_tokens.dtype == dtype:  # written in place, without two (rows, H) temporaries and their sum
                torch.mm(grad_gate, gate, out=grad_tokens[rows]).addmm_(grad_up, up)
            else:
                grad_tokens[rows] = grad_gate @ gate + grad_up @ up
        return grad_tokens, *grads, None, None


def _used_rows(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, its slice of the sorted rows) for every expert with at least one row."""
    starts = [0, *itertools.accumulate(counts)]
    return [(expert, slice(starts[expert], starts[expert + 1])) for expert, count in enumerate(counts) if count]


class RoutedExperts(nn.Module):
    """The E routed SwiGLU experts as three stacked weights: gate_proj and up_proj (E, I, H), down_proj (E, H, I).

    One module rather than E: DeepSpeed ZeRO-3 gathers all experts around one forward call that every rank makes,
    whatever its tokens, and DDP sees one parameter that always gets a gradient, so experts without tokens are simply
    skipped. A decode step can also pick its rows' experts by index (`gathered`), with no Python loop over experts, which
    lets it compile into one graph. The state dict keeps the published per-expert keys (`{e}.gate_proj.weight`, ...)."""

    WEIGHTS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's weights initialised as E separate nn.Linear layers would be, in the same order (so a seeded
        model draws the same numbers as the reference's per-expert layers)."""
        for expert in range(self.num_experts):
            for weight in (self.gate_proj, self.up_proj, self.down_proj):
                nn.init.kaiming_uniform_(weight[expert], a=math.sqrt(5))

    def normal_init_(self, std: float) -> None:
        """N(0, std) expert by expert: what CortexModel gives every Linear."""
        for expert in range(self.num_experts):
            for weight in (self.gate_proj, self.up_proj, self.down_proj):
                nn.init.normal_(weight[expert], mean=0.0, std=std)

    def forward(self, tokens: torch.Tensor, counts: list[int] | None = None,
                expert_ids: list[int] | None = None) -> torch.Tensor:
        """tokens (N, H) sorted by expert, counts[e] rows for expert e -> their outputs (N, H) in the same order.
        Or, for one-row decoding without autograd: tokens (1, H) and its expert_ids -> (len(expert_ids), H), one row
        per listed expert."""
        if expert_ids is None and sum(counts) and torch.is_grad_enabled():
            compute_dtype = matmul_dtype(tokens, self.gate_proj)  # autocast's when it is on, as nn.Linear would
            with torch.autocast(tokens.device.type, enabled=False):  # the function casts for itself
                return _SortedExpertsSwiGLU.apply(tokens, self.gate_proj, self.up_proj, self.down_proj, counts,
                                                  compute_dtype)

        def expert_mlp(expert: int, x: torch.Tensor) -> torch.Tensor:
            return F.linear(F.silu(F.linear(x, self.gate_proj[expert])) * F.linear(x, self.up_proj[expert]),
                            self.down_proj[expert])

        if expert_ids is not None:
            return torch.cat([expert_mlp(expert, tokens) for expert in expert_ids])
        outputs = [expert_mlp(expert, tokens[rows]) for expert, rows in _used_rows(counts)]
        return torch.cat(outputs) if outputs else tokens.new_empty(0, self.down_proj.shape[1])

    def gathered(self, rows: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """rows (N, H), expert_idx (N, K) -> each row through each of its K experts (N, K, H), the experts' weights
        picked by index: no data-dependent control flow, for decoding a few rows at a time in one compiled graph.
        (Running every expert on every row instead reads each weight once, but does E/K times the arithmetic, which
        was slower on CPU at 8 rows.)"""
        num_rows, top_k = expert_idx.shape
        idx = expert_idx.reshape(-1)
        inputs = rows.repeat_interleave(top_k, dim=0).unsqueeze(-1)  # (N*K, H, 1)
        gate = torch.bmm(self.gate_proj[idx], inputs)
        up = torch.bmm(self.up_proj[idx], inputs)
        return torch.bmm(self.down_proj[idx], F.silu(gate) * up).view(num_rows, top_k, -1)

    def _holds_zero3_shards(self) -> bool:
        """Under DeepSpeed ZeRO-3, outside a gather, the parameters are empty placeholders for this rank's shard
        (`ds_shape` keeps the real shape); DeepSpeed's own checkpoints then go by parameter name."""
        return hasattr(self.gate_proj, "ds_id") and tuple(self.gate_proj.shape) != tuple(self.gate_proj.ds_shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._holds_zero3_shards():
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        per_weight = [getattr(self, name).unbind(0) for name in self.WEIGHTS]
        for expert in range(self.num_experts):  # the published order: expert by expert
            for name, weights in zip(self.WEIGHTS, per_weight):
                destination[f"{prefix}{expert}.{name}.weight"] = weights[expert] if keep_vars else weights[expert].detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self._holds_zero3_shards():
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        expected = set()
        for name in self.WEIGHTS:
            stacked = getattr(self, name)
            for expert in range(self.num_experts):
                key = f"{prefix}{expert}.{name}.weight"
                expected.add(key)
                if key not in state_dict:
                    missing_keys.append(key)
                elif state_dict[key].shape != stacked.shape[1:]:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)} "
                                      f"from checkpoint, the shape in current model is {tuple(stacked.shape[1:])}.")
                else:
                    with torch.no_grad():
                        stacked[expert].copy_(state_dict[key])
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)


def unstack_expert_weights(named_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors named as parameters (`layers.1.mlp.experts.gate_proj`, stacked (E, ...)) -> state-dict keys
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
        self.shared_experts = (
            MLP(config.hidden_size, moe.intermediate_size * moe.n_shared_experts) if moe.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor, gather_experts: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, H) -> (output (B, T, H), aux loss (0-d fp32) in training mode else None).

        gather_experts: run each token's experts with weights picked by index (RoutedExperts.gathered) instead of
        sorting tokens by expert; for a few rows at a time, as in compiled decoding."""
        batch, seq_len, hidden = x.shape
        flat = x.reshape(-1, hidden)
        scores = self.gate(flat)
        weights, expert_idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor

        if gather_experts:
            routed = self.experts.gathered(flat, expert_idx)
        else:
            routed = self._run_sorted(flat, expert_idx)  # (N, K, H) in the experts' output dtype
        # Weighted sum in fp32 (the weights are fp32), then back to the experts' dtype: well defined under autocast too
        out = (routed.float() * weights.unsqueeze(-1)).sum(dim=1).to(routed.dtype)
        out = out.view(batch, seq_len, hidden)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux_loss = self._aux_loss(scores, expert_idx, batch, seq_len) if self.training else None
        return out, aux_loss

    def _run_sorted(self, flat: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """Sort the N*K (token, expert) assignments by expert, run each expert once on its contiguous slice, unsort."""
        num_tokens, top_k = expert_idx.shape
        if num_tokens == 1 and not torch.is_grad_enabled():  # one-row decoding: just its K experts, nothing to sort
            return self.experts(flat, expert_ids=expert_idx[0].tolist()).view(1, top_k, -1)
        assignments = expert_idx.reshape(-1)
        order = assignments.argsort(stable=True)
        counts = torch.bincount(assignments, minlength=self.num_experts).tolist()
        sorted_out = self.experts(flat.index_select(0, order // top_k), counts)
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
