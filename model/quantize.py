"""Int8 weight-only quantization for serving: the linear layers, the routed experts and the head read a quarter of
their fp32 bytes per token, which is what bounds CPU decoding.

Each output channel gets one scale (its largest |weight| / 127). On CPU the products run in torch's own int8 kernel
(torch._weight_int8pack_mm) with bf16 activations (with fp32 ones that kernel is 30x slower on an AVX2 CPU) when
decoding; for a prefill's many rows, and on other devices, the weights are dequantized per call. Swapped in at load time (serving/checkpoint.py); training never sees it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .moe import RoutedExperts

KERNEL_DTYPE = torch.bfloat16  # the activations' dtype in the CPU int8 kernel (its vectorised path)
# Above this many rows (a prompt's prefill) the weights are dequantized for x's own matmul: the int8 kernel is made for
# a few rows. (A 512-token prefill of the full model stayed ~3x fp32's time either way on the loaded AVX2 test CPU.)
KERNEL_MAX_ROWS = 32


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (..., out, in) -> int8 weight of that shape and fp32 scales (..., out): weight ~ int8 * scale."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=-1).clamp(min=1e-12) / 127
    return (weight / scales.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8), scales


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ (weight_int8 (out, in) * scales (out,)).T in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if x.device.type != "cpu" or len(rows) > KERNEL_MAX_ROWS:
        return F.linear(x, weight_int8.to(x.dtype) * scales.to(x.dtype).unsqueeze(-1))
    rows = rows.to(KERNEL_DTYPE)
    out = torch._weight_int8pack_mm(rows, weight_int8, scales.to(KERNEL_DTYPE))
    return out.to(x.dtype).view(*x.shape[:-1], -1)


class Int8Linear(nn.Module):
    """A bias-free nn.Linear (or the LMHead's logits path) with int8 weights."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError(f"Int8Linear has no bias; {linear} has one")
        weight_int8, scales = quantize_per_channel(linear.weight)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, with_entropy: bool = False,
                summed: bool = False) -> torch.Tensor:  # LMHead's signature
        if targets is not None:  # the training head's target log-probs: a quantized model only serves
            raise ValueError("an int8-quantized head only returns logits; score targets with the unquantized model")
        return int8_linear(x, self.weight_int8, self.scales)


class Int8RoutedExperts(nn.Module):
    """RoutedExperts (model/moe.py) with int8 stacked weights: each expert multiplies its slice of the sorted rows."""

    def __init__(self, experts: RoutedExperts):
        super().__init__()
        self.num_experts = experts.num_experts
        for name in RoutedExperts.WEIGHTS:
            weight_int8, scales = quantize_per_channel(getattr(experts, name))
            self.register_buffer(name, weight_int8)
            self.register_buffer(name + "_scales", scales)

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """x (N, H), expert_idx (N, K) -> each row through each of its K experts (N, K, H), as RoutedExperts."""
        num_rows, top_k = expert_idx.shape
        order = expert_idx.reshape(-1).argsort(stable=True)
        rows = x.index_select(0, order // top_k)
        counts = torch.bincount(expert_idx.reshape(-1), minlength=self.num_experts).tolist()
        outs = [self._expert(expert, chunk) for expert, chunk in enumerate(rows.split(counts)) if len(chunk)]
        out = torch.cat(outs)
        return out.new_empty(out.shape).index_copy(0, order, out).view(num_rows, top_k, -1)

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = ((getattr(self, name)[expert], getattr(self, name + "_scales")[expert])
                          for name in RoutedExperts.WEIGHTS)
        return int8_linear(F.silu(int8_linear(x, *gate)) * int8_linear(x, *up), *down)

    def gathered(self, rows: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        raise ValueError("int8 experts do not run in the compiled decode step: serve --quantize int8 without --compile")


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
