"""Where the model runs: DeepSpeed ZeRO (0-3, optional CPU offload), plain DDP, or one device (cuda, mps, cpu).

Every backend offers the same small surface to the training loop:
    forward(**batch) -> model outputs      backward(loss, discard)      step(lr) -> StepResult | None
    save(dir) / load(dir)                  full_state_dict()            generation_model() context
`step` is called after every micro-batch; it returns a StepResult only at the end of a gradient-accumulation group
(DeepSpeed decides that boundary itself; the others count micro-batches).

Skipping a group: a group whose gradients are not finite is not applied. The weights and the optimizer state (Adam's
moments and step count) stay exactly as they were, and the gradients are cleared. backward(loss, discard=True), used
for a micro-batch whose loss is non-finite on some rank, back-propagates loss x NaN: the backward still runs on every
micro-batch and every rank (DDP's all-reduce and ZeRO's hooks, buckets and reduce-scatters stay matched), and the
group's gradients are certainly non-finite. The skip itself is then each optimizer's own overflow path: DeepSpeed's ZeRO
1/2/3 and bf16/fp16 optimizers check the global gradient norm and discard the step (the fp16 loss-scale mechanism,
`engine.was_step_applied()` is False), and the torch backends check the clipped norm before optimizer.step().
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model.moe import unstack_expert_weights
from trainer.config import TrainConfig


@dataclass
class StepResult:
    grad_norm: float | None
    skipped: bool = False       # the update was not applied (non-finite gradients)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_backend(config: TrainConfig, info: DistInfo) -> str:
    if config.backend != "auto":
        if config.backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            raise RuntimeError("backend='deepspeed' but DeepSpeed is not installed: pip3 install -r requirements.txt")
        return config.backend
    launched = "WORLD_SIZE" in os.environ  # started by torchrun or the deepspeed launcher
    if launched and importlib.util.find_spec("deepspeed") is not None:
        return "deepspeed"
    return "ddp" if info.world_size > 1 else "single"


def resolve_precision(config: TrainConfig, device: torch.device) -> str:
    if config.precision != "auto":
        return config.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms (1-d), biases and embeddings are not decayed."""
    decay, no_decay = [], []
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_dist_env() -> list[str]:
    """A plain `python3 train_x.py` with the deepspeed backend: a one-process group without MPI discovery.
    Returns the variables it set, so close() can take them back."""
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port())}
    added = [k for k in defaults if k not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    return added


class Backend:
    name = "base"

    def __init__(self, config: TrainConfig, model: torch.nn.Module, info: DistInfo, device: torch.device, precision: str):
        self.config, self.info, self.device, self.precision = config, info, device, precision
        self.module = model  # the bare network (for generation, state dicts)

    # --- collectives (no-ops on one process) ---
    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and self.info.world_size > 1:
            values = values.detach().clone().to(self.comm_device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.info.world_size
        return values.cpu()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and self.info.world_size > 1:
            values = values.detach().clone().to(self.comm_device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.cpu()

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and self.info.world_size > 1:
            values = values.detach().clone().to(self.comm_device)
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values.cpu()

    @property
    def comm_device(self) -> torch.device:
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")

    @contextlib.contextmanager
    def generation_model(self):
        """The full network, in eval mode, ready for generation (ZeRO-3 gathers its shards first)."""
        was_training = self.module.training
        self.module.eval()
        try:
            yield self.module
        finally:
            self.module.train(was_training)

    def close(self) -> None:
        if dist.is_available() and dist.is_initialized():
            # Every rank is past its last collective before any rank moves on: a rank started by smart_train then
            # ends its process at once (trainer/launch.py run_rank), and no peer may still be waiting on it.
            dist.barrier()
            self._destroy_process_group()

    def _destroy_process_group(self) -> None:
        dist.destroy_process_group()


class TorchBackend(Backend):
    """One device, or DDP over several processes. Mixed precision with torch.autocast (+ GradScaler for fp16)."""

    def __init__(self, config, model, info, device, precision, use_ddp: bool):
        super().__init__(config, model, info, device, precision)
        self.name = "ddp" if use_ddp else "single"
        model.to(device)
        if use_ddp and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # Every expert module runs each forward (see model/moe.py), so no parameter is ever unused.
        self.train_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                            if use_ddp else model)
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(model, config.optim.weight_decay), lr=config.optim.initial_lr,
                                           betas=config.optim.betas, eps=config.optim.eps, fused=fused)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.micro_step = 0

    def is_boundary(self) -> bool:
        return (self.micro_step + 1) % self.config.grad_accum_steps == 0

    def forward(self, **batch):
        sync = contextlib.nullcontext()
        if isinstance(self.train_model, torch.nn.parallel.DistributedDataParallel) and not self.is_boundary():
            sync = self.train_model.no_sync()  # all-reduce gradients only on the last micro-batch of a group
        self._sync_ctx = sync
        sync.__enter__()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.train_model(**batch)

    def backward(self, loss: torch.Tensor, discard: bool = False) -> None:
        if discard:
            loss = loss * math.nan  # see the module docstring: the group's gradients become NaN, step() skips it
        self.scaler.scale(loss / self.config.grad_accum_steps).backward()
        self._sync_ctx.__exit__(None, None, None)

    def step(self, lr: float) -> StepResult | None:
        boundary = self.is_boundary()
        self.micro_step += 1
        if not boundary:
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip > 0 else math.inf)
        grad_norm = float(grad_norm)  # DDP: of the all-reduced gradients, the same on every rank
        skipped = not math.isfinite(grad_norm)
        if skipped:
            self.scaler.update()  # fp16: lower the scale after an overflow
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm, skipped)

    def save(self, directory: Path) -> None:
        if self.info.is_main:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scaler": self.scaler.state_dict(), "micro_step": self.micro_step}, directory / "train_state.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "train_state.pt", map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.micro_step = state["micro_step"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32) for k, v in self.module.state_dict().items()}


class AdamWSkippingNonFinite(torch.optim.AdamW):
    """AdamW that changes nothing when a gradient is not finite, and says so in `overflow`, the attribute DeepSpeed's
    engine reads to tell a skipped step (engine.was_step_applied()). ZeRO-0 in fp32 hands the gradients straight to
    the client optimizer with no overflow check of its own; ZeRO 1-3 and the bf16/fp16 optimizers check before they
    call this one."""
    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        return None if self.overflow else super().step(closure)


def _skip_deepspeed_cpu_shm_build() -> None:
    # On CPU, deepspeed.init_distributed JIT-compiles a shared-memory comm op (about 70 s, first run on a machine).
    # gloo does all our communication, so the op is not needed. The attribute lives on the module deepspeed.comm.torch
    # (reached through importlib: `import deepspeed.comm.torch as m` returns torch itself because of name shadowing).
    module = importlib.import_module("deepspeed.comm.torch")
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, config, model, info, device, precision):
        super().__init__(config, model, info, device, precision)
        import deepspeed

        # torch 2.13 deprecates the collective names DeepSpeed still calls, once per call: keep the log readable.
        warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)
        self._env_added = _ensure_dist_env()
        if device.type == "cpu":
            _skip_deepspeed_cpu_shm_build()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        ds = config.deepspeed
        if ds.offload_optimizer and device.type == "cuda":
            # The optimizer step runs on the CPU: DeepSpeed's vectorised CPU Adam (JIT-compiled on first use).
            # On a CPU-only machine torch's AdamW already runs there, and needs no compiling.
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(param_groups(model, config.optim.weight_decay), lr=config.optim.initial_lr,
                                         betas=config.optim.betas, eps=config.optim.eps, adamw_mode=True)
        else:
            # A torch optimizer: no op compiling, and fused kernels on CUDA. Only ZeRO-0 in fp32 lacks an overflow check
            # of DeepSpeed's own (and pays for this one's gradient norm).
            adamw = AdamWSkippingNonFinite if ds.zero_stage == 0 and precision == "fp32" else torch.optim.AdamW
            optimizer = adamw(param_groups(model, config.optim.weight_decay), lr=config.optim.initial_lr,
                              betas=config.optim.betas, eps=config.optim.eps, fused=device.type == "cuda")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.deepspeed_config(), dist_init_required=False)
        self.module = self.engine.module
        self._generation_copy: torch.nn.Module | None = None  # ZeRO-3 generation (see generation_model)

    def deepspeed_config(self) -> dict:
        c, ds = self.config, self.config.deepspeed
        zero: dict = {"stage": ds.zero_stage, "contiguous_gradients": True, "overlap_comm": self.device.type == "cuda",
                      "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
        if ds.zero_stage == 3:
            zero.update({"stage3_gather_16bit_weights_on_model_save": False, "stage3_max_live_parameters": 1e9,
                         "stage3_max_reuse_distance": 1e9})
        pin = self.device.type == "cuda"
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if ds.offload_param:
            if ds.zero_stage != 3:
                raise ValueError(f"deepspeed.offload_param needs ZeRO stage 3, the config says stage {ds.zero_stage}")
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
        cfg = {
            "train_micro_batch_size_per_gpu": c.micro_batch_size,
            "gradient_accumulation_steps": c.grad_accum_steps,
            "gradient_clipping": c.optim.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                     "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        return _deep_merge(cfg, ds.extra)

    def forward(self, **batch):
        return self.engine(**batch)

    def _destroy_process_group(self) -> None:
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups: a later run in this process works

    def close(self) -> None:
        super().close()
        for key in self._env_added:  # a later run in this process must not think it was launched distributed
            os.environ.pop(key, None)

    def backward(self, loss: torch.Tensor, discard: bool = False) -> None:
        # The real graph even when discarded: under ZeRO-3 the parameters are empty shards outside forward and
        # backward, so no other graph over them exists (see the module docstring for the skip).
        self.engine.backward(loss * math.nan if discard else loss)

    def step(self, lr: float) -> StepResult | None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()  # None under ZeRO-0 in fp32 (the engine computes none)
        norm = float(norm) if norm is not None else None
        return StepResult(norm, not self.engine.was_step_applied())

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag="deepspeed", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 weights (the optimizer's master copy in bf16/fp16 runs) on every rank. Collective: all ranks call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in self.module.named_parameters():
            full = safe_get_full_fp32_param(param)  # None when DeepSpeed keeps no separate master copy (fp32 ZeRO-0)
            state[name] = (full if full is not None else param.detach()).to("cpu", torch.float32).clone()
        return unstack_expert_weights(state)  # parameter names -> the state-dict keys of the published checkpoints

    @contextlib.contextmanager
    def generation_model(self):
        import deepspeed

        was_training = self.module.training
        self.module.eval()
        try:
            if self.config.deepspeed.zero_stage != 3:
                yield self.module
                return
            # ZeRO-3: gather the shards once, then generate with a plain copy of the network. The engine's module keeps
            # DeepSpeed's hooks, which gather and release parameters collectively in every forward: ranks that generate
            # different numbers of tokens (different prompts, sampling) would make different collective calls and hang.
            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                if self._generation_copy is None:
                    with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
                        self._generation_copy = type(self.module)(self.module.config)
                    self._generation_copy.requires_grad_(False).eval()
                self._generation_copy.load_state_dict({k: v.detach() for k, v in self.module.state_dict().items()},
                                                      strict=True)
                self._generation_copy.to(self.device, next(self.module.parameters()).dtype)
            yield self._generation_copy
        finally:
            self.module.train(was_training)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_backend(config: TrainConfig, model: torch.nn.Module) -> Backend:
    info = dist_info_from_env()
    device = pick_device(info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    name = resolve_backend(config, info)
    precision = resolve_precision(config, device)
    if name == "deepspeed":
        return DeepSpeedBackend(config, model, info, device, precision)
    if name in ("ddp", "single"):
        if name == "single" and info.world_size > 1:
            raise RuntimeError(f"backend='single' but WORLD_SIZE={info.world_size}: use backend 'ddp' or 'deepspeed'")
        return TorchBackend(config, model, info, device, precision, use_ddp=name == "ddp")
    raise ValueError(f"unknown backend {name!r}: use auto, deepspeed, ddp or single")
