"""DPO (task 'dpo'): preference loss against a frozen reference, plus an NLL term on the chosen responses.

Per pair, with S(y) = sum of log pi(y_t | y_<t) over the response tokens (training.md 6.2):
    delta = [S_policy(chosen) - S_policy(rejected)] - [S_ref(chosen) - S_ref(rejected)]
    sigmoid: -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)     (eps = label smoothing)
    ipo:     (delta - 1 / (2 beta))^2
    total = mean over pairs + nll_coef * mean over pairs of (-S_policy(chosen) / response tokens) + aux_loss_coef * aux
Every micro-batch holds micro_batch_size pairs, so averaging the micro-batches equally over accumulation steps and
ranks (what the backends do) is already the mean over the group's pairs: DPO is weighted by pairs, not tokens.

The response is the last assistant turn after its <assistant> tag, up to and including its </s>: labels != -100 (the
prompt turns are masked by the batch builder) and after the row's last <assistant>. The original also counted prompt
positions (with a dummy target 0) in the NLL term; an earlier assistant turn of a multi-turn prompt is prompt too.

The reference is a frozen copy of the stage's starting weights, built from the init weights (never copied from the
policy, so a resumed run has the same reference) and kept on the device: one extra forward per batch, no pass over the
data set before training. Its log-probs are attached to each batch by micro_batches / eval_metrics.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from trainer.config import DPOConfig
from trainer.data import IGNORE_INDEX
from trainer.tasks import LossOutput, Task, frozen_reference_model, next_token_targets, policy_autocast

LOSS_TYPES = ("sigmoid", "ipo")


def response_mask(input_ids: torch.Tensor, labels: torch.Tensor, assistant_id: int) -> torch.Tensor:
    """(B, T-1) float: 1 where the target token input_ids[:, t+1] belongs to the response (see the module docstring)."""
    t = torch.arange(input_ids.shape[1], device=input_ids.device)
    last_assistant = torch.where(input_ids == assistant_id, t, -1).amax(dim=1, keepdim=True)
    keep = (labels != IGNORE_INDEX) & (t > last_assistant)
    return keep[:, 1:].float()


def sequence_log_probs(forward, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(sum of the response tokens' log-probs (B,), number of response tokens (B,), the model output);
    mask (B, T-1) marks the response targets input_ids[:, 1:]."""
    targets = next_token_targets(input_ids.masked_fill(F.pad(mask, (1, 0)) == 0, IGNORE_INDEX))
    out = forward(input_ids=input_ids, attention_mask=attention_mask, targets=targets)
    return out["target_log_probs"].sum(dim=-1), mask.sum(dim=-1), out


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
               loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and delta (B,) from summed response log-probs."""
    delta = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, delta


class DPOTask(Task):
    kind = "dpo"
    eval_loss_metric = "dpo_loss"

    def __init__(self, config, tokenizer, data_files):
        super().__init__(config, tokenizer, data_files)
        self.dpo = d = config.dpo or DPOConfig()
        if d.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo.loss_type must be one of {LOSS_TYPES}, got {d.loss_type!r}")
        if d.beta <= 0 or not 0 <= d.label_smoothing < 0.5 or d.nll_coef < 0:
            raise ValueError(f"dpo needs beta > 0, 0 <= label_smoothing < 0.5 and nll_coef >= 0, got {d}")
        self._reference = None  # built on first use, on the backend's device

    def _pairs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[chosen; rejected] stacked along the batch: input ids, attention mask, response mask."""
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        return input_ids, attention_mask, response_mask(input_ids, labels, self.tokenizer.assistant_id)

    @torch.no_grad()
    def with_reference(self, batch: dict, backend) -> dict:
        """The batch plus the reference's summed response log-probs of both sides."""
        if self._reference is None:
            self._reference = frozen_reference_model(self.config, backend)
        input_ids, attention_mask, mask = self._pairs(batch)
        with policy_autocast(backend):
            sums, _, _ = sequence_log_probs(self._reference, input_ids, attention_mask, mask)
        chosen, rejected = sums.chunk(2)
        return {**batch, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def micro_batches(self, batch: dict, backend) -> Iterator[dict]:
        yield self.with_reference(batch, backend)

    def loss(self, forward, batch: dict) -> LossOutput:
        if "ref_chosen_logps" not in batch:
            raise KeyError("a DPO batch needs the reference log-probs: pass it through DPOTask.with_reference first")
        d = self.dpo
        input_ids, attention_mask, mask = self._pairs(batch)
        sums, counts, out = sequence_log_probs(forward, input_ids, attention_mask, mask)
        chosen, rejected = sums.chunk(2)
        losses, delta = dpo_losses(chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], d.beta,
                                   d.label_smoothing, d.loss_type)
        dpo_loss = losses.mean()
        nll_loss = -(chosen / counts.chunk(2)[0].clamp(min=1)).mean()
        total = dpo_loss + d.nll_coef * nll_loss
        aux = out.get("aux_loss")
        if aux is not None:
            total = total + self.config.aux_loss_coef * aux
        with torch.no_grad():
            reward_chosen = d.beta * (chosen - batch["ref_chosen_logps"])
            reward_rejected = d.beta * (rejected - batch["ref_rejected_logps"])
            metrics = {"dpo_loss": dpo_loss.detach(), "nll_loss": nll_loss.detach(),
                       "reward_chosen": reward_chosen.mean(), "reward_rejected": reward_rejected.mean(),
                       "reward_margin": (reward_chosen - reward_rejected).mean(),
                       "reward_accuracy": (delta > 0).float().mean(),
                       "logps_chosen": chosen.detach().mean(), "logps_rejected": rejected.detach().mean()}
            if aux is not None:
                metrics["aux_loss"] = aux.detach()
        return LossOutput(total, metrics, int(attention_mask.sum()))

    def eval_metrics(self, batch: dict, backend) -> dict[str, torch.Tensor]:
        """The DPO loss (logged as eval_loss), preference accuracy, margins and log-probs on held-out pairs."""
        return self.loss(backend.forward, self.with_reference(batch, backend)).metrics
