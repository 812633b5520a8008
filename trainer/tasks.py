"""What differs per stage, as small plug-ins of the one training loop: which data, how a batch becomes a loss.

A task provides
    sources              the data files of one epoch, trained in order
    micro_batches(b)     the training micro-batches made from one data batch (default: the batch itself)
    train_dataset(i)     the (deterministic, indexable) training dataset of source i; its `collate` builds batches
    eval_dataset()       held-out data for the eval loss: the last eval_fraction of the first source only
    loss(forward, batch) -> LossOutput: the scalar to backpropagate, metrics to log, and the number of tokens trained
    eval_metrics(b, backend)  held-out metrics of one eval batch; eval_loss_metric names the one logged as eval_loss
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from model import CortexModel
from trainer.checkpoint import load_init_weights, resolve_init_weights
from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX, load_dataset


@dataclass
class LossOutput:
    loss: torch.Tensor                              # what is backpropagated
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # 0-d tensors, averaged over micro-batches and ranks
    num_tokens: int = 0                             # tokens processed (for tokens/s and MFU)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets: position t predicts labels[t+1]; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def loss_token_count(labels: torch.Tensor) -> int:
    """The tokens a language-modelling loss is taken over: next-token targets that are not IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def lm_loss(forward, inputs: dict, labels: torch.Tensor, per_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """Next-token cross entropy summed over the micro-batch's loss tokens (IGNORE_INDEX labels do not count) and
    divided by per_tokens, by default their own number (a token mean); computed in fp32 by the model's chunked head
    without the (B, T, V) logits. Returns (loss, the model output)."""
    targets = next_token_targets(labels)
    out = forward(**inputs, targets=targets, sum_target_log_probs=True)
    return -out["target_log_probs"] / (per_tokens or (targets != IGNORE_INDEX).sum().clamp(min=1)), out


def policy_autocast(backend):
    """The autocast of the backend's training forward, for forwards that call the bare module (old log-probs of a
    rollout, the reference model): they must see the same precision as the training forward. DeepSpeed keeps its
    weights in the training dtype itself and has no autocast."""
    dtype = getattr(backend, "autocast_dtype", None)
    return torch.autocast(backend.device.type, dtype=dtype, enabled=dtype is not None)


def frozen_reference_model(config: TrainConfig, backend) -> torch.nn.Module:
    """The stage's starting weights as a frozen model on the backend's device, in the policy's weight dtype.

    Loaded from the init weights, never copied from the policy, so a resumed run compares with the same reference."""
    path = resolve_init_weights(config.init_from, config.stage, config.run_root)
    if path is None:
        raise ValueError(f"stage {config.stage!r} needs a frozen reference model, built from the stage's starting "
                         f"weights, but init_from is None (random init): set init_from in utils.py or --init-from")
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the sampling/dropout RNG as it was
        reference = CortexModel(config.model)
    load_init_weights(reference, path)
    dtype = next(backend.module.parameters()).dtype
    return reference.to(backend.device, dtype).eval().requires_grad_(False)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "doc_boundary_mask") if k in batch}


class Task:
    kind = "base"      # the data kind passed to trainer.data.load_dataset
    shuffle = True
    # Token-weighted tasks: the loop counts the loss tokens of each accumulation group up front (loss_tokens of every
    # micro-batch, all ranks) and passes their mean per micro-batch as batch["mean_loss_tokens"] (see
    # Trainer._mean_loss_tokens); loss() divides its summed token loss by it. Other tasks weigh micro-batches equally.
    token_weighted = False
    updates_per_batch = 1  # training micro-batches made from each data batch (GRPO: several updates per rollout)
    eval_loss_metric: str | None = "lm_loss"  # the eval_metrics entry logged as eval_loss (None: no eval loss)

    def __init__(self, config: TrainConfig, tokenizer, data_files: list[Path]):
        if not data_files:
            raise ValueError(f"stage {config.stage!r} has no data files: set data.files or data.jsonl_files in utils.py")
        self.config, self.tokenizer, self.data_files = config, tokenizer, data_files

    @property
    def sources(self) -> list[Path]:
        return self.data_files

    def _load(self, path: Path, split: str, eval_fraction: float) -> Dataset:
        return load_dataset(self.kind, path, self.tokenizer, self.config.data.max_seq_len, split=split,
                            eval_fraction=eval_fraction)

    def train_dataset(self, index: int) -> Dataset:
        # Only the first source holds data out: the eval set is the same from step 0 on and needs no other file on
        # disk (files are fetched as training reaches them); the others train in full. JSONL lines marked
        # "split": "eval" are never trained, in any file.
        return self._load(self.data_files[index], "train", self.config.data.eval_fraction if index == 0 else 0.0)

    def eval_dataset(self) -> Dataset | None:
        if self.config.data.eval_fraction <= 0:
            return None
        return self._load(self.data_files[0], "eval", self.config.data.eval_fraction)

    def micro_batches(self, batch: dict, backend) -> Iterator[dict]:
        """The training micro-batches made from one data batch (each is followed by backend.step)."""
        yield batch

    def loss(self, forward, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError

    def loss_tokens(self, batch: dict) -> int:
        """The loss tokens of one collated micro-batch (token-weighted tasks only)."""
        raise NotImplementedError

    def eval_metrics(self, batch: dict, backend) -> dict[str, torch.Tensor]:
        """Held-out metrics of one eval batch (0-d tensors, run under no_grad with the model in eval mode)."""
        return {self.eval_loss_metric: self.loss(backend.forward, batch).metrics[self.eval_loss_metric]}

    def eval_prompts(self) -> list[tuple[str, list[int]]]:
        """(text, prompt ids) for the sample generations logged at each eval: raw continuations for pretraining,
        a system + user chat prompt ending in <assistant> otherwise (a /think or /no think suffix stays in the text)."""
        if self.kind == "pretrain":
            return [(p, self.tokenizer.encode(p)) for p in self.config.eval_prompts]
        return [(p, self.tokenizer.encode_prompt([{"role": "system", "content": " "}, {"role": "user", "content": p}]))
                for p in self.config.eval_prompts]


class LanguageModelingTask(Task):
    """Pretraining on packed windows (kind 'pretrain') and SFT on masked conversations (kind 'sft'): one loss.

    Token-weighted: an accumulation group's lm loss is the token mean over all its micro-batches on all ranks, so a
    short SFT micro-batch weighs what its tokens weigh (the original averaged per-micro-batch means equally). The MoE
    aux loss stays a per-micro-batch mean, weighted equally."""
    token_weighted = True

    def __init__(self, config, tokenizer, data_files, kind: str):
        super().__init__(config, tokenizer, data_files)
        self.kind = kind
        self.shuffle = kind == "sft"  # pretrain shards are already document-shuffled; windows stay in file order

    def loss_tokens(self, batch):
        return loss_token_count(batch["labels"])

    def loss(self, forward, batch):
        # batch["mean_loss_tokens"]: set by the training loop (the group's weighting); absent (eval): a token mean
        lm, out = lm_loss(forward, model_inputs(batch), batch["labels"], batch.get("mean_loss_tokens"))
        aux = out.get("aux_loss")
        total = lm + self.config.aux_loss_coef * aux if aux is not None else lm
        metrics = {"lm_loss": lm.detach(), "aux_loss": (aux if aux is not None else torch.zeros(())).detach()}
        if self.kind == "sft":
            metrics["trained_token_share"] = (batch["labels"][:, 1:] != IGNORE_INDEX).float().mean()
        num_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return LossOutput(total, metrics, num_tokens)
