"""Training configuration as plain dataclasses. `utils.py` fills these in per stage; nothing here reads the environment."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from file_dataset import MODELSCOPE_DATASET
from model import ModelConfig

Backend = Literal["auto", "deepspeed", "ddp", "single"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]

# Stage order: each stage starts from the consolidated weights of the one before it (see trainer/checkpoint.py).
STAGE_ORDER = ("pretrain_stage0", "pretrain_stage1", "cot", "grpo", "mix", "dpo")


@dataclass
class OptimConfig:
    initial_lr: float            # lr at step 0; warmup goes linearly from here to max_lr
    max_lr: float
    min_lr: float                # cosine decays from max_lr to this, then stays
    warmup_ratio: float = 0.1    # share of optimizer steps spent warming up
    weight_decay: float = 0.01   # not applied to norms, biases or embeddings
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0       # max global grad norm; 0 disables clipping


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False   # ZeRO-3 only
    # Extra keys merged into the generated DeepSpeed config (e.g. {"zero_optimization": {"overlap_comm": False}}).
    extra: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    # Token files (our .npy format or the original .pkl), by name; fetched from ModelScope dataset dataset_id into
    # data_dir as training reaches them (file_dataset.py).
    files: list[str] = field(default_factory=list)
    data_dir: str = "./data"
    dataset_id: str = MODELSCOPE_DATASET
    # Or raw JSONL files tokenised at load (the bundled sample data of the tiny preset).
    jsonl_files: list[str] = field(default_factory=list)
    max_seq_len: int = 512            # pretrain window / SFT truncation length
    eval_fraction: float = 0.01       # held-out share of the stage's first file (JSONL uses its own "split" field)
    max_eval_batches: int = 20
    delete_consumed_files: bool = False  # delete each file once training is past it (except the first: held-out split)


@dataclass
class GRPOConfig:
    """GSPO/GRPO (task 'grpo'): one rollout of group_size completions per prompt, then grpo_steps updates on it."""
    group_size: int = 8                # completions sampled per prompt (G)
    grpo_steps: int = 4                # optimizer updates on each rollout (the lr schedule counts every one)
    max_new_tokens: int = 1024         # completion budget; a completion cut off here has no </s> ("truncated")
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = 0.95
    importance_sampling_level: Literal["seq", "token"] = "seq"  # seq: GSPO (one ratio per completion); token: GRPO
    clip_eps_low: float = 3e-4         # the ratio is clipped to [1 - clip_eps_low, 1 + clip_eps_high]
    clip_eps_high: float = 4e-4
    beta: float = 0.0                  # weight of the k3 KL to the frozen reference (the stage's starting weights)
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"  # how token losses are averaged (trainer/grpo.py)
    advantage_eps: float = 1e-4        # (r - mean) / (std + eps)
    skip_zero_std_groups: bool = False  # groups whose rewards are all equal carry no signal: leave them out of the loss
    reward: str = "cortex"             # a name in trainer.rewards.REWARDS, or "package.module:function"


@dataclass
class DPOConfig:
    """DPO (task 'dpo'): preference loss against the frozen starting weights, plus an NLL term on chosen responses."""
    beta: float = 0.1
    label_smoothing: float = 0.0       # conservative DPO: the share of pairs assumed mislabelled (sigmoid loss only)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    nll_coef: float = 0.2              # weight of the mean token NLL of the chosen responses


@dataclass
class TrainConfig:
    stage: str                         # one of STAGE_ORDER; names the run dir runs/<stage>/
    task: Literal["pretrain", "sft", "dpo", "grpo"]
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    epochs: int = 1
    micro_batch_size: int = 4          # per device
    grad_accum_steps: int = 1
    # The global batch the learning rates were tuned for: sequences (pairs for DPO, prompts for GRPO) per optimizer step
    # over all ranks. None: whatever the run uses. See fit_global_batch for what happens when a run differs.
    recipe_global_batch: int | None = None
    backend: Backend = "auto"          # auto: deepspeed when launched with several processes and it is installed
    precision: Precision = "auto"      # auto: bf16 on GPUs that support it, else fp32
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory, ~1/3 more compute)
    aux_loss_coef: float = 1e-3        # MoE load-balancing loss weight (the model returns it unscaled)
    seed: int = 42                     # each rank uses seed + rank
    init_from: str | None = "auto"     # "auto": previous stage's final weights; a .bin/.safetensors/run dir; None: random init
    run_root: str = "./runs"
    save_every_steps: int = 100
    keep_last_checkpoints: int = 2     # while training; 0 keeps all
    keep_checkpoints_after_stage: bool = False  # False: a completed stage keeps its final weights and its last checkpoint
    eval_every_steps: int = 100
    eval_prompts: list[str] = field(default_factory=list)
    eval_max_new_tokens: int = 64      # per sample generation
    samples: bool = True               # sample generations of eval_prompts at each eval and at the end of the stage
    max_sample_prompts: int = 4        # at most this many eval_prompts are generated from each time
    log_every_steps: int = 1
    max_consecutive_nonfinite: int = 5  # this many optimizer steps in a row skipped (non-finite loss/gradient) stop the run
    max_steps: int | None = None       # stop early (smoke tests); the lr schedule still follows the data
    peak_flops: float | None = None    # per device, for MFU; None: looked up from the device name
    tokenizer: str = "cortex"          # "cortex": the Cortex 2.5 tokenizer (TOKEN_DIR or ./tokens); "tiny": our BPE of
                                       # the sample data; or a directory holding tokenizer files
    grpo: GRPOConfig | None = None     # task 'grpo' settings (None: the Cortex defaults)
    dpo: DPOConfig | None = None       # task 'dpo' settings (None: the Cortex defaults)


def global_batch(config: TrainConfig, world_size: int) -> int:
    """Sequences (pairs for DPO, prompts for GRPO) per optimizer step over all ranks. GRPO's accumulation splits one
    rollout, so it does not add prompts."""
    return world_size * config.micro_batch_size * (1 if config.task == "grpo" else config.grad_accum_steps)


def fit_global_batch(config: TrainConfig, world_size: int,
                     keep_accumulation: bool = False) -> tuple[TrainConfig, str | None]:
    """The run's config for world_size ranks, and a note when it differs from the recipe's global batch.

    The rule: the global batch the learning rates were tuned for is kept by changing grad_accum_steps when
    world_size x micro_batch_size divides it (and accumulation was not set by hand: keep_accumulation, e.g. the
    --grad-accum-steps flag); otherwise the learning rates (initial, max and min) are scaled linearly by
    actual / recipe global batch, as the original recipe scaled them with the number of GPUs."""
    recipe = config.recipe_global_batch
    actual = global_batch(config, world_size)
    if recipe is None or actual == recipe:
        return config, None
    per_step = world_size * config.micro_batch_size
    if config.task != "grpo" and not keep_accumulation and recipe % per_step == 0:
        accum = recipe // per_step
        note = (f"world size {world_size} x micro-batch {config.micro_batch_size} x {config.grad_accum_steps} "
                f"accumulation steps = {actual} differs from the recipe's global batch {recipe}: "
                f"grad_accum_steps {config.grad_accum_steps} -> {accum} keeps it (learning rates unchanged)")
        return replace(config, grad_accum_steps=accum), note
    scale = actual / recipe
    optim = replace(config.optim, initial_lr=config.optim.initial_lr * scale, max_lr=config.optim.max_lr * scale,
                    min_lr=config.optim.min_lr * scale)
    note = (f"global batch {actual} (world size {world_size} x micro-batch {config.micro_batch_size}"
            f"{'' if config.task == 'grpo' else f' x {config.grad_accum_steps} accumulation steps'}) differs from the "
            f"recipe's {recipe}, and accumulation cannot make them equal"
            f"{' (set by hand)' if keep_accumulation and config.task != 'grpo' else ''}: learning rates scaled "
            f"linearly by {actual}/{recipe} = {scale:.3g} (max_lr {config.optim.max_lr:.3g} -> {optim.max_lr:.3g})")
    return replace(config, optim=optim), note
