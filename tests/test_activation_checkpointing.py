"""Activation checkpointing per block (trainer/activation_checkpointing.py): the same loss, gradients and router
statistics as without it, under every backend, and less peak memory."""
from dataclasses import replace

import pytest
import torch

import utils
from model import CortexModel
from trainer.activation_checkpointing import enable_activation_checkpointing
from trainer.backend import build_backend
from trainer.metrics import RouterStats

# The tiny preset's model with dropout on: the recompute must draw the same masks as the first forward.
MODEL = replace(utils.stage_config("pretrain_stage0", preset="tiny").model, attention_dropout=0.1)


def batch(seed: int, rows: int = 2, length: int = 32) -> torch.Tensor:
    return torch.randint(0, MODEL.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


def loss_of(forward, ids: torch.Tensor) -> torch.Tensor:
    out = forward(input_ids=ids, targets=ids, sum_target_log_probs=True)
    return -out["target_log_probs"] / ids.numel() + 1e-3 * out["aux_loss"]


def model_run(checkpointing: bool):
    torch.manual_seed(0)
    model = CortexModel(MODEL).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    stats = RouterStats(model)
    torch.manual_seed(1)
    loss = loss_of(model, batch(0))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.detach(), grads, stats.sums, stats.tokens


def test_same_loss_gradients_and_router_counts_with_dropout():
    loss, grads, sums, tokens = model_run(False)
    ckpt_loss, ckpt_grads, ckpt_sums, ckpt_tokens = model_run(True)
    assert ckpt_loss == loss
    assert grads.keys() == ckpt_grads.keys()
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=0, atol=1e-7, msg=name)
    # the router hook fires again in the recompute: it must not count those tokens twice
    assert ckpt_tokens == tokens == [64] * len(tokens)
    assert all(torch.equal(a, b) for a, b in zip(ckpt_sums, sums))  # expert counts and entropy sums


def test_parameter_names_and_no_grad_forwards_are_unchanged():
    plain, wrapped = CortexModel(MODEL), CortexModel(MODEL)
    enable_activation_checkpointing(wrapped)
    assert list(plain.state_dict()) == list(wrapped.state_dict())
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in wrapped.named_parameters()]
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_activation_checkpointing(wrapped)


def backend_run(monkeypatch, backend: str, zero_stage: int, checkpointing: bool):
    """Two optimizer steps of 2 accumulated micro-batches: the losses and the resulting fp32 weights."""
    if backend in ("ddp", "deepspeed"):
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(29500 + zero_stage + 10 * checkpointing)}.items():
            monkeypatch.setenv(key, value)
    config = replace(utils.stage_config("pretrain_stage0", preset="tiny"), model=MODEL, backend=backend,
                     precision="fp32", grad_accum_steps=2, micro_batch_size=2)
    config = replace(config, deepspeed=replace(config.deepspeed, zero_stage=zero_stage))
    torch.manual_seed(0)
    model = CortexModel(MODEL)
    if checkpointing:
        enable_activation_checkpointing(model)
    runner = build_backend(config, model)
    try:
        torch.manual_seed(1)
        losses = []
        for micro in range(4):
            loss = loss_of(runner.forward, batch(micro))
            runner.backward(loss)
            runner.step(lr=1e-2)
            losses.append(float(loss.detach()))
        return losses, runner.full_state_dict()
    finally:
        runner.close()


@pytest.mark.parametrize("backend,zero_stage", [("single", 0), ("ddp", 0), ("deepspeed", 0), ("deepspeed", 1),
                                                ("deepspeed", 2), ("deepspeed", 3)])
def test_every_backend_trains_the_same_with_checkpointing(monkeypatch, backend, zero_stage):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    losses, weights = backend_run(monkeypatch, backend, zero_stage, False)
    ckpt_losses, ckpt_weights = backend_run(monkeypatch, backend, zero_stage, True)
    assert ckpt_losses == pytest.approx(losses, rel=1e-6)
    assert losses[2] != losses[0]  # the weights moved between the steps
    for name in weights:
        torch.testing.assert_close(ckpt_weights[name], weights[name], rtol=1e-6, atol=1e-7, msg=name)
