"""How much memory a stage needs per GPU, from the configs alone: `python3 train_x.py --plan [--world-size N] [--json]`.

Nothing is built or downloaded. Every figure is bytes per GPU, for one worst-case micro-batch (every sequence at
data.max_seq_len), Adam(W) as the optimizer, Ψ = total parameters and N = world size:

  parameters        DeepSpeed keeps them in the training dtype (bf16: 2Ψ), split over N under ZeRO-3 (none on the GPU
                    with offload_param); one device and DDP keep fp32 weights (4Ψ) and compute under autocast
  gradients         ZeRO-0/1 bf16: the full fp32 accumulation (BF16_Optimizer) or the full bf16 gradients, ZeRO-2/3:
                    split over N; mixed precision adds the fp32 gradient partition the optimizer steps on (4Ψ/N)
  optimizer states  fp32 Adam moments (8Ψ) and, in mixed precision, the fp32 master weights (4Ψ), split over N from
                    ZeRO-1 on (bf16 ZeRO-0 splits them too: DeepSpeed's BF16_Optimizer); on the CPU with
                    offload_optimizer
  ZeRO buffers      ZeRO-1/2 gradient reduce buckets (reduce_bucket_size, two with overlap_comm on CUDA); ZeRO-3
                    the gathered parameters (min(Ψ, stage3_max_live_parameters) in the training dtype: with Cortex's
                    max reuse distance the whole model stays gathered through forward and backward) and one reduce
                    bucket; DDP its gradient buckets (4Ψ)
  model copies      DPO's frozen reference (and GRPO's when beta > 0), and the plain copy ZeRO-3 generates with (GRPO)
  activations       what autograd keeps for backward per token and layer, counted tensor by tensor from the model's code
                    (layer_activation_bytes; checked against the saved tensors on CPU in tests/test_memory_plan.py),
                    plus the attention mask; with activation checkpointing each layer keeps only its input and one layer
                    is recomputed at a time
  head              the chunked head's buffers (model/head.py): a chunk of fp32 logits and, in bf16, its low-precision
                    copy, the fp32 lm_head gradient and bf16 products formed in forward, the hidden states' gradient
  rollout           GRPO's generation: the KV cache of micro_batch_size x group_size sequences (not at the same time as
                    the activations, so the total takes the larger of the two)

total = parameters + gradients + optimizer states + ZeRO buffers + model copies + max(activations + head, rollout);
with checkpointing the head's buffers and the recomputed layer are not live at once (the head's backward comes first),
so its activations count the kept layer inputs plus the larger of the two. It is an estimate of the peak of what tensors hold, like torch.cuda.max_memory_allocated: the CUDA context (~0.5 GB),
allocator fragmentation and NCCL buffers come on top, so leave ~10% free. README "Planning memory" compares it with
measured peaks.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from model import ModelConfig, count_parameters
from model.head import CHUNK_ELEMENTS
from trainer.config import GRPOConfig, TrainConfig, global_batch

GB = 1e9


def _norm_bytes(width: int, rows: int, act: int) -> int:
    """RMSNorm of `rows` rows per token, `width` elements in all (F.rms_norm of x in fp32): x in fp32 and the normalised
    x in the activations' dtype, plus 1 / rms per row."""
    return (4 + act) * width + 4 * rows


def layer_activation_bytes(config: ModelConfig, layer_idx: int, act: int, kv_saved: int) -> int:
    """Bytes autograd keeps per token for one decoder layer's backward.

    act: bytes of the activations' dtype (2 bf16/fp16, 4 fp32). kv_saved: width of the keys and values attention keeps
    (num_key_value_heads x head_dim, or hidden_size where CUDA's masked kernel needs them repeated per query head)."""
    h, heads = config.hidden_size, config.num_attention_heads
    kv = config.num_key_value_heads * config.head_dim
    qk_norms = 0
    if config.use_qk_norm:
        qk_norms = _norm_bytes(h, heads, act) + _norm_bytes(kv, config.num_key_value_heads, act)
    # attn_norm, its output (the q/k/v projections' input), q/k norms, rotated q, k and v, the attention output (also
    # o_proj's input), the log-sum-exp per head
    attention = _norm_bytes(h, 1, act) + act * h + qk_norms + act * h + 2 * act * kv_saved + act * h + 4 * heads
    ffn = _norm_bytes(h, 1, act) + act * h  # mlp_norm and its output
    if config.is_moe_layer(layer_idx):
        moe = config.moe_config
        k, experts = moe.num_experts_per_tok, moe.n_routed_experts
        ffn += (4 * h if act != 4 else 0) + 4 * experts  # the router's fp32 input and its scores
        ffn += 12 * k + 16 * k  # top-k ids and weights; the sort's gather and scatter indices (int64)
        # the K gathered token rows, each expert's gate and up projections, silu(gate) and their product, the experts'
        # sorted and unsorted outputs (the latter in fp32 for the weighted sum)
        ffn += act * k * h + 4 * act * k * moe.intermediate_size + act * k * h + 4 * k * h
        ffn += 4 * act * moe.intermediate_size * moe.n_shared_experts  # the shared expert's SwiGLU
    else:
        ffn += 4 * act * config.intermediate_size  # gate, up, silu(gate), their product
    return attention + ffn


@dataclass
class MemoryPlan:
    stage: str
    world_size: int
    backend: str
    precision: str
    zero_stage: int | None
    offload: str
    micro_batch_size: int
    grad_accum_steps: int
    global_batch: int                 # sequences (pretrain/SFT), pairs (DPO) or prompts (GRPO) per optimizer step
    global_batch_tokens: int          # at most: every sequence at max_seq_len
    recipe_note: str | None           # how the recipe's global batch was kept (or not), None when it is the recipe's
    lr: dict                          # initial, max, min
    total_parameters: int
    sequences_per_micro_batch: int
    seq_len: int
    bytes: dict                       # per GPU: parameters, gradients, optimizer_states, zero_buffers, model_copies,
                                      # activations, activations_checkpointed, head, rollout
    activation_bytes_per_token: int   # all layers, without checkpointing
    cpu_offload_bytes: int            # held in CPU memory instead (per rank)
    total: int
    total_checkpointed: int

    def table(self) -> str:
        b = self.bytes
        gb = lambda x: f"{x / GB:8.2f} GB"  # noqa: E731
        zero = f"ZeRO-{self.zero_stage}" if self.backend == "deepspeed" else self.backend
        lines = [
            f"stage {self.stage}: {self.world_size} GPU(s), {zero}, {self.precision}"
            f"{', offload ' + self.offload if self.offload else ''}",
            f"  model: {self.total_parameters:,} parameters",
            f"  micro-batch: {self.sequences_per_micro_batch} sequences x {self.seq_len} tokens; "
            f"{self.grad_accum_steps} accumulation step(s)",
            f"  global batch: {self.global_batch} ({self.world_size} GPUs x {self.micro_batch_size} x "
            f"{self.grad_accum_steps} accumulation), up to {self.global_batch_tokens:,} tokens per optimizer step",
            f"  learning rate: {self.lr['initial']:.3g} -> {self.lr['max']:.3g} -> {self.lr['min']:.3g}",
        ]
        if self.recipe_note:
            lines.append(f"  note: {self.recipe_note}")
        lines += [
            "  per GPU:",
            f"    parameters            {gb(b['parameters'])}",
            f"    gradients             {gb(b['gradients'])}",
            f"    optimizer states      {gb(b['optimizer_states'])}",
            f"    ZeRO / DDP buffers    {gb(b['zero_buffers'])}",
            f"    model copies          {gb(b['model_copies'])}",
            f"    activations           {gb(b['activations'])}   "
            f"({self.activation_bytes_per_token / 1e6:.2f} MB per token)",
            f"      with checkpointing  {gb(b['activations_checkpointed'])}",
            f"    head buffers          {gb(b['head'])}",
        ]
        if b["rollout"]:
            lines.append(f"    rollout KV cache      {gb(b['rollout'])}")
        lines += [f"    total                 {gb(self.total)}",
                  f"    total, checkpointing  {gb(self.total_checkpointed)}"]
        if self.cpu_offload_bytes:
            lines.append(f"  CPU memory for the offloaded states: {self.cpu_offload_bytes / GB:.2f} GB per rank")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def resolve_plan_backend(config: TrainConfig, world_size: int) -> str:
    """What a run on GPUs would use: DeepSpeed under smart_train when it is installed, else DDP or one device."""
    if config.backend != "auto":
        return config.backend
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        return "deepspeed"
    return "ddp" if world_size > 1 else "single"


def estimate(config: TrainConfig, world_size: int, device: str = "cuda", backend: str | None = None,
             recipe_note: str | None = None) -> MemoryPlan:
    """The memory plan of config (already fitted to world_size: trainer.config.fit_global_batch, whose note is
    recipe_note) on world_size GPUs. device 'cpu': the CPU kernels' layout, for checking the estimate on a CPU."""
    backend = backend or resolve_plan_backend(config, world_size)
    m, n = config.model, world_size
    psi = count_parameters(m).total
    precision = config.precision if config.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    act = 4 if precision == "fp32" else 2
    ds = config.deepspeed
    zero = ds.zero_stage if backend == "deepspeed" else None
    mixed = precision != "fp32"

    # --- model states ---
    cpu = 0
    if backend == "deepspeed":
        p = act  # DeepSpeed casts the model to the training dtype
        params = psi * p // n if zero == 3 else psi * p
        if zero == 3 and ds.offload_param:
            cpu += params
            params = 0
        if zero == 0:
            grads = psi * 4
        elif zero == 1:
            grads = psi * p + (psi * 4 // n if mixed else 0)
        else:
            grads = psi * p // n + (psi * 4 // n if mixed else 0)
        optimizer = psi * (12 if mixed else 8)
        if zero > 0 or precision == "bf16":  # ZeRO-0 in bf16 is DeepSpeed's BF16_Optimizer, which splits them too
            optimizer //= n
        if ds.offload_optimizer:
            fp32_grads = psi * 4 // n if mixed and zero > 0 else 0
            cpu += optimizer + fp32_grads
            grads -= fp32_grads
            optimizer = 0
        zero_settings = {"reduce_bucket_size": 5e8, "stage3_max_live_parameters": 1e9,  # as trainer/backend.py sets
                         **ds.extra.get("zero_optimization", {})}
        bucket = int(zero_settings["reduce_bucket_size"])
        overlap = device == "cuda"
        if zero in (1, 2):  # contiguous_gradients: the reduce bucket, allocated whole (twice with overlap_comm)
            buffers = bucket * p * (2 if overlap else 1)
        elif zero == 3:
            buffers = (min(psi, int(zero_settings["stage3_max_live_parameters"])) + bucket) * p
        else:
            buffers = 0
    else:  # one device or DDP: fp32 weights, gradients and moments; autocast computes in bf16
        p = 4
        params, grads, optimizer = psi * 4, psi * 4, psi * 8
        buffers = psi * 4 if backend == "ddp" else 0
    grpo = config.grpo or GRPOConfig()
    copies = 0
    if config.task == "dpo" or (config.task == "grpo" and grpo.beta > 0):
        copies += psi * p  # the frozen reference, whole on every rank
    if config.task == "grpo" and zero == 3:
        copies += psi * p  # the gathered copy generation runs on

    # --- activations of one micro-batch ---
    seq_len = config.data.max_seq_len
    rows = config.micro_batch_size
    if config.task == "dpo":
        rows *= 2  # chosen and rejected in one forward
    elif config.task == "grpo":
        rows = rows * grpo.group_size // config.grad_accum_steps  # the rollout split into accumulation steps
    tokens = rows * seq_len
    # Every task's batches carry a mask (pretraining packs documents, the others pad), and with a mask CUDA's attention
    # kernel needs the keys and values repeated per query head (model/attention.py); the CPU kernel does not.
    kv_saved = m.hidden_size if device == "cuda" else m.num_key_value_heads * m.head_dim
    per_layer = [layer_activation_bytes(m, i, act, kv_saved) for i in range(m.num_hidden_layers)]
    outside = _norm_bytes(m.hidden_size, 1, act) + act * m.hidden_size + 16  # head_norm, the head's input, ids, targets
    mask = rows * seq_len * seq_len * (act + (1 if config.task == "pretrain" else 0))  # the additive bias (+ bool mask)
    activations = tokens * (sum(per_layer) + outside) + mask
    kept = tokens * (m.num_hidden_layers * act * m.hidden_size + outside) + mask  # checkpointing: the layers' inputs
    recomputed = tokens * max(per_layer)  # one layer at a time, in backward
    checkpointed = kept + recomputed
    vocab, hidden = m.vocab_size, m.hidden_size
    chunk = min(max(1, CHUNK_ELEMENTS // vocab), tokens)  # positions per chunk of the head (model/head.py)
    head = chunk * vocab * (4 + (act if act != 4 else 0))  # fp32 logits chunk (+ its low-precision copy)
    if config.task == "grpo":
        head += chunk * vocab * 4  # the probabilities kept for the entropy
    else:  # the summed score forms its gradients in forward: lm_head's (fp32, + bf16 products) and the hidden states'
        head += vocab * hidden * (4 + (act + 4 if act != 4 else 0)) + tokens * hidden * act
    rollout = 0
    if config.task == "grpo":
        kv = m.num_key_value_heads * m.head_dim
        rollout = config.micro_batch_size * grpo.group_size * seq_len * m.num_hidden_layers * 2 * kv * act

    states = params + grads + optimizer + buffers + copies
    total = states + max(activations + head, rollout)
    # with checkpointing the head is done (its backward comes first) before any layer is recomputed
    total_checkpointed = states + max(kept + max(head, recomputed), rollout)
    batch = global_batch(config, n)
    offload = ", ".join(k for k, on in (("optimizer", ds.offload_optimizer), ("parameters", ds.offload_param))
                        if on and backend == "deepspeed")
    return MemoryPlan(
        stage=config.stage, world_size=n, backend=backend, precision=precision, zero_stage=zero, offload=offload,
        micro_batch_size=config.micro_batch_size, grad_accum_steps=config.grad_accum_steps, global_batch=batch,
        global_batch_tokens=batch * seq_len * (2 if config.task == "dpo" else 1)
        * (grpo.group_size if config.task == "grpo" else 1),
        recipe_note=recipe_note,
        lr={"initial": config.optim.initial_lr, "max": config.optim.max_lr, "min": config.optim.min_lr},
        total_parameters=psi, sequences_per_micro_batch=rows, seq_len=seq_len,
        bytes={"parameters": params, "gradients": grads, "optimizer_states": optimizer, "zero_buffers": buffers,
               "model_copies": copies, "activations": activations, "activations_checkpointed": checkpointed,
               "head": head, "rollout": rollout},
        activation_bytes_per_token=sum(per_layer) + outside, cpu_offload_bytes=cpu, total=total,
        total_checkpointed=total_checkpointed)


def visible_world_size() -> int:
    """WORLD_SIZE when launched, else the visible GPUs (at least 1)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    import torch

    return max(1, torch.cuda.device_count())


def print_plan(config: TrainConfig, world_size: int, recipe_note: str | None, as_json: bool) -> MemoryPlan:
    plan = estimate(config, world_size, recipe_note=recipe_note)
    print(plan.to_json() if as_json else plan.table())
    return plan
