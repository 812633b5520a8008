"""Token-weighted loss over an accumulation group: the gradient the optimizer receives after SFT micro-batches with
unequal numbers of loss tokens equals, by hand, the gradient of one big batch's token-mean loss."""
from dataclasses import replace

import pytest
import torch

import utils
from model import CortexModel
from trainer.cli import build_task
from trainer.loop import Trainer, micro_batch_plan
from trainer.metrics import read_metrics
from trainer.tasks import lm_loss, loss_token_count, model_inputs


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_gradient_is_the_token_mean_of_the_whole_group(tmp_path):
    config = utils.stage_config("cot", preset="tiny")
    config = replace(config, run_root=str(tmp_path), init_from=None, backend="single", precision="fp32",
                     micro_batch_size=2, grad_accum_steps=3, max_steps=1, aux_loss_coef=0.0, eval_every_steps=0,
                     samples=False, optim=replace(config.optim, grad_clip=0.0),
                     data=replace(config.data, eval_fraction=0.0))
    trainer = Trainer(config, lambda c: build_task(c, utils.data_files(c)))
    initial = {k: v.clone() for k, v in trainer.backend.module.state_dict().items()}
    seen = []  # the gradients the optimizer steps with (torch's own pre-step hook)
    trainer.backend.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(_grads(trainer.backend.module)))
    try:
        run_dir = trainer.train()
    finally:
        trainer.backend.close()
    assert len(seen) == 1

    # the group the run trained on: the first 3 micro-batches of the plan
    dataset = trainer.task.train_dataset(0)
    rows = micro_batch_plan(len(dataset), config, 1, 0, epoch=0, file_index=0, shuffle=True)[:3]
    micro = [dataset.collate([dataset[int(i)] for i in row]) for row in rows]
    counts = [loss_token_count(b["labels"]) for b in micro]
    assert len(set(counts)) == 3, counts  # unequal micro-batches: a per-micro-batch mean would weigh them wrongly

    model = CortexModel(config.model)
    model.load_state_dict(initial, strict=True)
    # by hand: one big batch (right-padded, so each real token sees what it saw), sum of token NLL / all its tokens
    big = dataset.collate([dataset[int(i)] for i in rows.reshape(-1)])
    assert loss_token_count(big["labels"]) == sum(counts)
    loss, _ = lm_loss(model, model_inputs(big), big["labels"])
    loss.backward()
    loss = loss.detach()
    expected = _grads(model)
    got = seen[0]
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)
    logged = read_metrics(run_dir / "metrics.jsonl")[0]["lm_loss"]
    assert logged == pytest.approx(loss.item(), rel=1e-5)

    # the old weighting (the mean of per-micro-batch token means) gives another gradient: the test can tell them apart
    model.zero_grad()
    sum(lm_loss(model, model_inputs(b), b["labels"])[0] for b in micro).div(3).backward()
    old = _grads(model)
    assert max(float((old[n] - expected[n]).abs().max() / expected[n].abs().max().clamp(min=1e-12))
               for n in expected) > 1e-2
