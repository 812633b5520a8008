"""Weight formats for serving: the linear layers, the routed experts and the head stored in fewer bytes than the
model's dtype, since reading the weights for every token is what bounds CPU decoding. Swapped in at load time
(serving/checkpoint.py); training never sees it.

In both formats products of up to 32 rows on the CPU (decoding, a short prompt's rows per expert) run in cpu_gemv.c
with fp32 activations where it can be built (x86 with AVX2 and a C compiler: one row reads the stored weights about
twice as fast as torch's kernels there, 8 rows took a quarter of torch's bf16 time on AVX2); elsewhere in torch's.

- bf16: the weights rounded to bf16 (what training's bf16 autocast multiplied by), half of fp32's bytes. Without
  cpu_gemv.c a product of a few rows takes torch's bf16 GEMV with bf16 activations (fp32 accumulation). On CPUs
  without native bf16 matmuls (AVX2) a prompt's many rows in bf16 would take oneDNN's emulated bf16 GEMM (5-9x
  fp32's time): so a prefill multiplies in the model's dtype (fp32) with the weights cast per call. Where bf16 matmuls
  are native (AVX512-BF16, AMX) a prefill multiplies in bf16 instead (prefill_dtype): 0.6x the time on a Zen 4.
- int8: one scale per output channel (its largest |weight| / 127). Without cpu_gemv.c a product of a few rows runs
  in torch's own int8 kernel (torch._weight_int8pack_mm) with bf16 activations (with fp32 ones that kernel is 30x
  slower on an AVX2 CPU) and bf16 scales, kept in bf16 whatever the model's dtype so that no call casts them; a
  prefill's many rows multiply by the weights dequantized per call (to bf16 where bf16 is native, as above).
  (torch's dynamic int8 linear, which also quantizes the activations, decoded ~15% faster here but cost held-out
  agreement and memory: README, "The full model on a CPU".)

Each MLP (the dense layer's, the shared experts) and routed expert keeps its gate and up weights as one (2I, H) weight:
two products instead of three (~3 ms off an int8 eager step of the full model; README, "The full model on a CPU").

On other devices the weights are always cast or dequantized per call.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from model.head import LMHead, target_log_probs
from model.mlp import MLP
from model.moe import RoutedExperts, sorted_by_expert
from serving import cpu_gemv

log = logging.getLogger(__name__)

KERNEL_DTYPE = torch.bfloat16  # the activations' dtype (and int8's scales') in torch's CPU kernels for a few rows
# Above this many rows (a prompt's prefill) the weights are cast or dequantized for x's own matmul: the kernels are
# made for a few rows (a 512-token prefill of the full model took ~3x fp32's time in the int8 one, 5-9x in bf16, AVX2).
KERNEL_MAX_ROWS = cpu_gemv.MAX_ROWS
# torch._weight_int8pack_mm's AVX-512 code reads 16 columns at a time: at other widths it returned garbage or crashed
# (torch 2.13, a Zen 4 CPU), so such layers (none in the Cortex presets) multiply by the dequantized weights instead.
INT8_KERNEL_COLUMN_STEP = 16
# each format's buffers per weight, in the order kernel_linear and unpacked take them
STORED_NAMES = {"bf16": ("weight_bf16",), "int8": ("weight_int8", "scales", "kernel_scales")}
WEIGHT_FORMATS = tuple(STORED_NAMES)


def kernels(weight_format: str, prefill_dtype: torch.dtype | None = None) -> str:
    """What a weight format runs on CPU (bench_cpu_chat prints it)."""
    prompts = "the model's dtype" if prefill_dtype is None else f"{prefill_dtype} (activations cast too)"
    if cpu_gemv.enabled:
        few_rows = f"serving/cpu_gemv.c (fp32 activations) for up to {cpu_gemv.MAX_ROWS} rows"
    elif weight_format == "bf16":
        few_rows = "F.linear in bf16 (torch's bf16 GEMV, fp32 accumulation) for up to 32 rows"
    else:
        few_rows = "torch._weight_int8pack_mm (bf16 activations and scales) for up to 32 rows"
    unpacked_to = "weights cast to" if weight_format == "bf16" else "weights dequantized to"
    return f"{few_rows}, {unpacked_to} {prompts} for longer prompts"


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (..., out, in) -> int8 weight of that shape and fp32 scales (..., out): weight ~ int8 * scale."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=-1).clamp(min=1e-12) / 127
    return (weight / scales.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8), scales


def stored(weight: torch.Tensor, weight_format: str) -> dict[str, torch.Tensor]:
    """weight (..., out, in) in a weight format, as its STORED_NAMES buffers: bf16 the weight in bf16; int8 the int8
    weight, fp32 scales (for dequantizing) and bf16 ones (for the kernel)."""
    if weight_format == "bf16":
        tensors = [weight.detach().to(torch.bfloat16)]
    else:
        weight_int8, scales = quantize_per_channel(weight)
        tensors = [weight_int8, scales, scales.to(KERNEL_DTYPE)]
    return dict(zip(STORED_NAMES[weight_format], tensors))


def uses_kernel(x: torch.Tensor, *weights: list[torch.Tensor]) -> bool:
    """Whether x (..., in) times the stored weights runs in the CPU kernels (a few rows), not in x's own matmul."""
    return x.device.type == "cpu" and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1] and all(
        len(weight) == 1 or weight[0].shape[-1] % INT8_KERNEL_COLUMN_STEP == 0 for weight in weights)


def kernel_dtype(x: torch.Tensor, weight: list[torch.Tensor]) -> torch.dtype:
    """The activations' dtype of the CPU kernel that multiplies x (..., in) by the stored weight."""
    return torch.float32 if uses_gemv(x, weight) else KERNEL_DTYPE


def gemv_weight(weight: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A stored weight as cpu_gemv takes it: the weight and its fp32 scales (int8) or None (bf16)."""
    return weight[0], weight[1] if len(weight) == 3 else None


def uses_gemv(x: torch.Tensor, weight: list[torch.Tensor]) -> bool:
    return cpu_gemv.usable(x.reshape(-1, x.shape[-1]), *gemv_weight(weight))


def uses_gemv_mlp(x: torch.Tensor, gate_up: list[torch.Tensor], down: list[torch.Tensor]) -> bool:
    return uses_gemv(x, gate_up) and uses_gemv(x, down)


def kernel_linear(x: torch.Tensor, weight: list[torch.Tensor]) -> torch.Tensor:
    """x (..., in) in kernel_dtype @ the stored weight's (out, in).T -> (..., out) in kernel_dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if uses_gemv(rows, weight):
        out = cpu_gemv.gemv(rows, *gemv_weight(weight))
    elif len(weight) == 1:  # bf16
        out = F.linear(rows, weight[0])
    else:  # int8: weight, scales, kernel scales
        out = torch._weight_int8pack_mm(rows, weight[0], weight[2])
    return out.view(*x.shape[:-1], -1)


def unpacked(weight: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The stored weight as a plain (out, in) weight in dtype."""
    if len(weight) == 1:
        return weight[0].to(dtype)
    return weight[0].to(dtype) * weight[1].to(dtype).unsqueeze(-1)


class _StoredModule(nn.Module):
    """Keeps its bf16 buffers (`*_bf16`, `*kernel_scales`) in bf16 and int8's own scales in fp32 (what cpu_gemv.c
    takes) through model.to(dtype): cast once, not per call. prefill_dtype: the dtype a prompt's rows on the CPU (more
    than the kernels take) multiply in; None: the input's own."""

    def __init__(self, weight_format: str, prefill_dtype: torch.dtype | None = None):
        super().__init__()
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight format {weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}")
        self.weight_format = weight_format
        self.prefill_dtype = prefill_dtype

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype x (..., in) multiplies in: prefill_dtype for a prompt's many rows on the CPU, else x's own."""
        prefill = x.device.type == "cpu" and x.numel() > KERNEL_MAX_ROWS * x.shape[-1]
        return self.prefill_dtype if prefill and self.prefill_dtype is not None else x.dtype

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if name.endswith(("_bf16", "kernel_scales")):
                self._buffers[name] = buffer.to(torch.bfloat16)
            elif name.endswith("scales"):  # int8's own: fp32 for cpu_gemv.c in a bf16 or fp16 model too
                self._buffers[name] = buffer.to(torch.float32)
        return self

    def store(self, prefix: str, weight: torch.Tensor):
        """Registers weight (..., out, in) in this module's format as buffers named prefix + its STORED_NAMES."""
        for name, buffer in stored(weight, self.weight_format).items():
            self.register_buffer(prefix + name, buffer, persistent=name != "kernel_scales")

    def stored_weight(self, prefix: str = "") -> list[torch.Tensor]:
        return [getattr(self, prefix + name) for name in STORED_NAMES[self.weight_format]]

    def extra_repr(self) -> str:
        return f"weight_format={self.weight_format}, prefill_dtype={self.prefill_dtype}"


class StoredLinear(_StoredModule):
    """A bias-free nn.Linear (or the LMHead) with its weight in a weight format."""

    def __init__(self, linear: nn.Linear, weight_format: str, prefill_dtype: torch.dtype | None = None):
        super().__init__(weight_format, prefill_dtype)
        if linear.bias is not None:
            raise ValueError(f"StoredLinear has no bias; {linear} has one")
        self.store("", linear.weight)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, with_entropy: bool = False,
                summed: bool = False) -> torch.Tensor:  # LMHead's signature
        if targets is not None:  # the head's target log-probs (eval.py's held-out loss), from the stored weights
            return target_log_probs(x, unpacked(self.stored_weight(), x.dtype), targets, with_entropy, summed)
        if uses_kernel(x, self.stored_weight()):
            return kernel_linear(x.to(kernel_dtype(x, self.stored_weight())), self.stored_weight()).to(x.dtype)
        dtype = self.compute_dtype(x)
        return F.linear(x.to(dtype), unpacked(self.stored_weight(), dtype)).to(x.dtype)


def stored_mlp(x: torch.Tensor, gate_up: list[torch.Tensor], down: list[torch.Tensor]) -> torch.Tensor:
    """x (n, H) -> down(silu(gate(x)) * up(x)) (n, H) in x's dtype, gate and up stored as one (2I, H) weight."""
    if uses_gemv_mlp(x, gate_up, down):  # a few rows: the whole MLP in one C call
        return cpu_gemv.mlp(x.to(torch.float32), *gemv_weight(gate_up), *gemv_weight(down)).to(x.dtype)
    if uses_kernel(x, gate_up, down):  # the whole MLP in the kernel's dtype: one cast in, one out
        gate, up = kernel_linear(x.to(kernel_dtype(x, gate_up)), gate_up).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        return kernel_linear(hidden.to(kernel_dtype(hidden, down)), down).to(x.dtype)
    gate, up = F.linear(x, unpacked(gate_up, x.dtype)).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, unpacked(down, x.dtype))


class StoredMLP(_StoredModule):
    """MLP (model/mlp.py: the dense layer's and the shared experts) with its weights in a weight format."""

    def __init__(self, mlp: MLP, weight_format: str, prefill_dtype: torch.dtype | None = None):
        super().__init__(weight_format, prefill_dtype)
        self.store("gate_up_proj_", torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.store("down_proj_", mlp.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = stored_mlp(rows.to(self.compute_dtype(rows)), self.stored_weight("gate_up_proj_"),
                         self.stored_weight("down_proj_"))
        return out.to(x.dtype).view_as(x)


class StoredRoutedExperts(_StoredModule):
    """RoutedExperts (model/moe.py) with stacked weights in a weight format: each expert multiplies its slice of the
    sorted rows (a single row: its K experts in turn)."""

    def __init__(self, experts: RoutedExperts, weight_format: str, prefill_dtype: torch.dtype | None = None):
        super().__init__(weight_format, prefill_dtype)
        self.num_experts = experts.num_experts
        self.store("gate_up_proj_", torch.cat([experts.gate_proj, experts.up_proj], dim=1))  # (E, 2I, H)
        self.store("down_proj_", experts.down_proj)

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """x (N, H), expert_idx (N, K) -> each row through each of its K experts (N, K, H), as RoutedExperts."""
        return routed_experts(x.to(self.compute_dtype(x)), expert_idx, *self.weights()).to(x.dtype)

    def gathered(self, rows: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """The compiled decode step's form (RoutedExperts.gathered): forward as one opaque op in the graph."""
        return routed_experts_op(rows, expert_idx, *self.weights())

    def weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """gate_up's and down's stored_weight() tensors (E, ...): the custom op's arguments."""
        return self.stored_weight("gate_up_proj_"), self.stored_weight("down_proj_")


def routed_experts(x: torch.Tensor, expert_idx: torch.Tensor, gate_up: list[torch.Tensor],
                   down: list[torch.Tensor]) -> torch.Tensor:
    """x (N, H), expert_idx (N, K), StoredRoutedExperts.weights() -> (N, K, H): each row through each of its K
    experts."""
    if x.shape[0] == 1:  # decoding one sequence: its K experts differ, so no sort (~0.1 ms of small ops a layer;
        # a compiled int8 step of the full model took 31.4 against 37.5 ms, README)
        if uses_gemv_mlp(x, gate_up, down):
            return cpu_gemv.experts(x.to(torch.float32), expert_idx[0].tolist(), *gemv_weight(gate_up),
                                    *gemv_weight(down)).to(x.dtype)
        return torch.stack([stored_expert(gate_up, down, expert, x) for expert in expert_idx[0].tolist()], dim=1)

    def experts(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        chunks = rows.split(counts.tolist())
        return torch.cat([stored_expert(gate_up, down, expert, chunk)
                          for expert, chunk in enumerate(chunks) if len(chunk)])

    return sorted_by_expert(x, expert_idx, gate_up[0].shape[0], experts)


# In a compiled graph inductor's own kernel for int8 expert rows picked by index (dequantized in the loop) took ~10x
# the eager time here (6 ms against 0.6 ms per layer of the full model, AVX2): so the eager code runs as one op
# (torch.library.define/impl: a call costs half of custom_op's, cpu_gemv.py).
torch.library.define("cortex::stored_routed_experts",
                     "(Tensor x, Tensor expert_idx, Tensor[] gate_up, Tensor[] down) -> Tensor")
torch.library.impl("cortex::stored_routed_experts", "default", routed_experts)
routed_experts_op = torch.ops.cortex.stored_routed_experts.default


@torch.library.register_fake("cortex::stored_routed_experts")
def _(x: torch.Tensor, expert_idx: torch.Tensor, gate_up: list[torch.Tensor],
      down: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], expert_idx.shape[1], x.shape[1])


def stored_expert(gate_up: list[torch.Tensor], down: list[torch.Tensor], expert: int, x: torch.Tensor) -> torch.Tensor:
    """x (n, H) through one expert of StoredRoutedExperts.weights() -> (n, H) in x's dtype."""
    return stored_mlp(x, [tensor[expert] for tensor in gate_up], [tensor[expert] for tensor in down])


def store_weights(model: nn.Module, weight_format: str, prefill_dtype: torch.dtype | None = None) -> nn.Module:
    """model with every nn.Linear (the LMHead included), MLP and RoutedExperts in weight_format ('bf16', 'int8'), as
    stored_form, after loading cpu_gemv's kernel (or saying why products of a few rows run on torch's)."""
    load_kernel(weight_format)
    return stored_form(model, weight_format, prefill_dtype)


def load_kernel(weight_format: str):
    """Loads cpu_gemv's kernel for a model in weight_format, or logs why its products of a few rows run on torch's."""
    if not cpu_gemv.enabled and (why_not := cpu_gemv.load()) is not None:
        log.warning("%s weights: products of a few rows use torch's kernels, about half as fast on AVX2, because %s",
                    weight_format, why_not)


def stored_form(module: nn.Module, weight_format: str, prefill_dtype: torch.dtype | None = None) -> nn.Module:
    """An nn.Linear, MLP or RoutedExperts in weight_format; any other module with those inside it swapped, in place.
    The embedding, norms and router stay as they are (a row read per token, or tiny). prefill_dtype: what a prompt's
    products multiply in on the CPU (None: the model's dtype), the head's excepted: logits keep the model's dtype
    (prompt log-probs score whole prompts)."""
    if isinstance(module, MLP):
        return StoredMLP(module, weight_format, prefill_dtype)
    if isinstance(module, nn.Linear):
        return StoredLinear(module, weight_format, None if isinstance(module, LMHead) else prefill_dtype)
    if isinstance(module, RoutedExperts):
        return StoredRoutedExperts(module, weight_format, prefill_dtype)
    for name, child in module.named_children():
        setattr(module, name, stored_form(child, weight_format, prefill_dtype))
    return module
