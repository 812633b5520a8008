"""Int8 weight-only quantization for serving: the linear layers, the routed experts and the head read a quarter of
their fp32 bytes per token, which is what bounds CPU decoding. Swapped in at load time (serving/checkpoint.py);
training never sees it.

Each output channel gets one scale (its largest |weight| / 127). On CPU the products of a few rows (decoding) run in
torch's own int8 kernel (torch._weight_int8pack_mm) with bf16 activations (with fp32 ones that kernel is 30x slower on
an AVX2 CPU) and bf16 scales, kept in bf16 whatever the model's dtype so that no call casts them; for a prefill's many
rows, and on other devices, the weights are dequantized per call. (torch's dynamic int8 linear, which also quantizes
the activations, decoded ~15% faster here but cost held-out agreement and memory: README, "The full model on a CPU".)
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.head import target_log_probs
from model.moe import RoutedExperts, sorted_by_expert

KERNEL_DTYPE = torch.bfloat16  # the activations' and scales' dtype in the CPU int8 kernel (its vectorised path)
# Above this many rows (a prompt's prefill) the weights are dequantized for x's own matmul: the int8 kernel is made for
# a few rows (a 512-token prefill of the full model took ~3x fp32's time in it on the AVX2 test CPU).
KERNEL_MAX_ROWS = 32
KERNEL_INFO = ("torch._weight_int8pack_mm (bf16 activations and scales) for up to 32 rows, dequantized weights "
               "for longer prompts")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (..., out, in) -> int8 weight of that shape and fp32 scales (..., out): weight ~ int8 * scale."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=-1).clamp(min=1e-12) / 127
    return (weight / scales.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8), scales


def uses_kernel(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1]


def kernel_linear(x: torch.Tensor, weight_int8: torch.Tensor, kernel_scales: torch.Tensor) -> torch.Tensor:
    """x (..., in) in KERNEL_DTYPE @ (weight_int8 (out, in) * kernel_scales (out,)).T -> (..., out) in KERNEL_DTYPE."""
    out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight_int8, kernel_scales)
    return out.view(*x.shape[:-1], -1)


def dequantized_linear(x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantized(weight_int8, scales, x.dtype))


def dequantized(weight_int8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight_int8.to(dtype) * scales.to(dtype).unsqueeze(-1)


class _Int8Module(nn.Module):
    """Keeps its `*kernel_scales` buffers in KERNEL_DTYPE through model.to(dtype): cast once, not per call."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if name.endswith("kernel_scales"):
                self._buffers[name] = buffer.to(KERNEL_DTYPE)
        return self


class Int8Linear(_Int8Module):
    """A bias-free nn.Linear (or the LMHead) with int8 weights."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError(f"Int8Linear has no bias; {linear} has one")
        weight_int8, scales = quantize_per_channel(linear.weight)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("kernel_scales", scales.to(KERNEL_DTYPE), persistent=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, with_entropy: bool = False,
                summed: bool = False) -> torch.Tensor:  # LMHead's signature
        if targets is not None:  # the head's target log-probs (eval.py's held-out loss), from the int8 weights
            return target_log_probs(x, dequantized(self.weight_int8, self.scales, x.dtype), targets, with_entropy,
                                    summed)
        if uses_kernel(x):
            return kernel_linear(x.to(KERNEL_DTYPE), self.weight_int8, self.kernel_scales).to(x.dtype)
        return dequantized_linear(x, self.weight_int8, self.scales)


class Int8RoutedExperts(_Int8Module):
    """RoutedExperts (model/moe.py) with int8 stacked weights: each expert multiplies its slice of the sorted rows."""

    def __init__(self, experts: RoutedExperts):
        super().__init__()
        self.num_experts = experts.num_experts
        for name in RoutedExperts.WEIGHTS:
            weight_int8, scales = quantize_per_channel(getattr(experts, name))
            self.register_buffer(name, weight_int8)
            self.register_buffer(name + "_scales", scales)
            self.register_buffer(name + "_kernel_scales", scales.to(KERNEL_DTYPE), persistent=False)

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """x (N, H), expert_idx (N, K) -> each row through each of its K experts (N, K, H), as RoutedExperts."""
        return routed_experts(x, expert_idx, self.weights())

    def gathered(self, rows: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """The compiled decode step's form (RoutedExperts.gathered): forward as one opaque op in the graph."""
        return routed_experts_op(rows, expert_idx, self.weights())

    def weights(self) -> list[torch.Tensor]:
        """gate, up, down: each as int8 weight, scales, kernel scales."""
        return [getattr(self, name + suffix) for name in RoutedExperts.WEIGHTS
                for suffix in ("", "_scales", "_kernel_scales")]


def routed_experts(x: torch.Tensor, expert_idx: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """x (N, H), expert_idx (N, K), Int8RoutedExperts.weights() -> (N, K, H): each row through each of its K experts."""
    def experts(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        chunks = rows.split(counts.tolist())
        return torch.cat([_expert(weights, expert, chunk) for expert, chunk in enumerate(chunks) if len(chunk)])

    return sorted_by_expert(x, expert_idx, weights[0].shape[0], experts)


# In a compiled graph inductor's own kernel for int8 expert rows picked by index (dequantized in the loop) took ~10x
# the eager time here (6 ms against 0.6 ms per layer of the full model, AVX2): so the eager code runs as one op.
routed_experts_op = torch.library.custom_op("cortex::int8_routed_experts", routed_experts, mutates_args=())


@routed_experts_op.register_fake
def _(x: torch.Tensor, expert_idx: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], expert_idx.shape[1], x.shape[1])


def _expert(weights: list[torch.Tensor], expert: int, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = ([weight[expert] for weight in weights[i:i + 3]] for i in (0, 3, 6))
    if uses_kernel(x):  # the whole expert in KERNEL_DTYPE: one cast in, one out
        rows = x.to(KERNEL_DTYPE)
        hidden = F.silu(kernel_linear(rows, gate[0], gate[2])) * kernel_linear(rows, up[0], up[2])
        return kernel_linear(hidden, down[0], down[2]).to(x.dtype)
    hidden = F.silu(dequantized_linear(x, *gate[:2])) * dequantized_linear(x, *up[:2])
    return dequantized_linear(hidden, *down[:2])


def quantize_int8(model: nn.Module) -> nn.Module:
    """Swaps every nn.Linear (the LMHead included) and RoutedExperts of model for its int8 form, in place. The
    embedding, norms and router stay as they are (a row read per token, or tiny)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
            elif isinstance(child, RoutedExperts):
                setattr(parent, name, Int8RoutedExperts(child))
    return model
