"""DPO: the loss against hand-computed values, the response mask, the frozen reference, and a short stage run."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import utils
from model import CortexModel, save_weights
from trainer.backend import build_backend
from trainer.cli import build_task, get_tokenizer
from trainer.data import SpecialIds, dpo_batch
from trainer.dpo import DPOTask, dpo_losses, response_mask
from trainer.loop import run_stage
from trainer.metrics import read_metrics
from trainer.tasks import frozen_reference_model


def test_sigmoid_loss_with_and_without_label_smoothing_and_ipo():
    policy_chosen, policy_rejected = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    losses, delta = dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    assert delta.tolist() == pytest.approx([2.0, -1.0])
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.1))])
    smoothed, _ = dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.1)
    assert smoothed[0].item() == pytest.approx(0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2)))
    ipo, _ = dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(2.0 - 5.0) ** 2, (-1.0 - 5.0) ** 2])
    with pytest.raises(ValueError, match="loss_type"):
        dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="hinge")


def _pair_batch(tokenizer):
    prompt = [{"role": "system", "content": " "}, {"role": "user", "content": "What is 2 + 3? /no think"},
              {"role": "assistant", "think": " ", "content": "2 + 3 = 5."},
              {"role": "user", "content": "Now add 1. /no think"}]
    chosen = prompt + [{"role": "assistant", "think": " ", "content": "The answer is 6."}]
    rejected = prompt + [{"role": "assistant", "think": " ", "content": "I don't feel like answering that."}]
    encode = tokenizer.apply_chat_template
    pairs = [(torch.tensor(encode(chosen)), torch.tensor(encode(rejected)))]
    return dpo_batch(pairs, SpecialIds.of(tokenizer))


def test_response_mask_covers_only_the_last_assistant_turn():
    tokenizer = get_tokenizer("tiny")
    batch = _pair_batch(tokenizer)
    for side, text in (("chosen", "The answer is 6."), ("rejected", "I don't feel like answering that.")):
        ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
        mask = response_mask(ids, labels, tokenizer.assistant_id)
        targets = ids[:, 1:][mask.bool()].tolist()
        # not the earlier assistant turn (trained by SFT, prompt here), not the <assistant> tag, not the padding
        assert tokenizer.decode(targets) == f"<think> </think><answer>{text}</answer></s>"


def test_dpo_loss_nll_term_uses_chosen_response_tokens_only():
    tokenizer = get_tokenizer("tiny")
    config = utils.stage_config("dpo", preset="tiny")
    task = DPOTask(config, tokenizer, utils.data_files(config))
    torch.manual_seed(0)
    model = CortexModel(config.model)  # training mode: it returns the MoE aux loss
    batch = _pair_batch(tokenizer)
    batch |= {"ref_chosen_logps": torch.tensor([-30.0]), "ref_rejected_logps": torch.tensor([-40.0])}
    out = task.loss(model, batch)

    logits = model(batch["chosen_input_ids"])["logits"][0, :-1]
    targets = batch["chosen_input_ids"][0, 1:]
    mask = response_mask(batch["chosen_input_ids"], batch["chosen_labels"], tokenizer.assistant_id)[0].bool()
    nll = F.cross_entropy(logits[mask], targets[mask])
    assert out.metrics["nll_loss"].item() == pytest.approx(nll.item(), rel=1e-5)
    logps_chosen = -nll.item() * int(mask.sum())
    assert out.metrics["logps_chosen"].item() == pytest.approx(logps_chosen, rel=1e-5)

    delta = (logps_chosen - out.metrics["logps_rejected"].item()) - (-30.0 + 40.0)
    dpo = math.log1p(math.exp(-0.1 * delta))
    assert out.metrics["dpo_loss"].item() == pytest.approx(dpo, rel=1e-5)
    assert out.metrics["reward_margin"].item() == pytest.approx(0.1 * delta, rel=1e-5)
    assert out.metrics["reward_accuracy"].item() == float(delta > 0)
    expected = dpo + config.dpo.nll_coef * nll.item() + config.aux_loss_coef * out.metrics["aux_loss"].item()
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(KeyError, match="reference log-probs"):
        task.loss(model, _pair_batch(tokenizer))


def test_the_reference_is_the_stages_starting_weights_frozen(tmp_path):
    config = utils.stage_config("dpo", preset="tiny")
    start = tmp_path / "start.safetensors"
    torch.manual_seed(1)
    save_weights(CortexModel(config.model), start)
    torch.manual_seed(2)
    policy = CortexModel(config.model)  # e.g. a policy resumed from a checkpoint: not what the reference must be
    config = replace(config, init_from=str(start), backend="single")
    backend = build_backend(config, policy)
    reference = frozen_reference_model(config, backend)
    expected = load_file(start)
    assert all(torch.equal(v, expected[k]) for k, v in reference.state_dict().items())
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    with pytest.raises(ValueError, match="init_from is None"):
        frozen_reference_model(replace(config, init_from=None), backend)


def test_dpo_stage_runs_and_learns_preferences(tmp_path):
    config = utils.stage_config("dpo", preset="tiny")
    init = tmp_path / "init.safetensors"
    torch.manual_seed(0)
    save_weights(CortexModel(config.model), init)
    config = replace(config, run_root=str(tmp_path), init_from=str(init), max_steps=6, eval_every_steps=3,
                     data=replace(config.data, max_eval_batches=2))
    run = run_stage(config, lambda c: build_task(c, utils.data_files(c)))
    steps = read_metrics(run / "metrics.jsonl")
    assert len(steps) == 6
    for key in ("dpo_loss", "nll_loss", "aux_loss", "reward_chosen", "reward_rejected", "reward_margin",
                "reward_accuracy", "logps_chosen", "logps_rejected"):
        assert all(math.isfinite(s[key]) for s in steps), key
    evals = read_metrics(run / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 3, 6]
    # step 0: policy == reference, so delta = 0 on every held-out pair
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and evals[0]["eval_reward_accuracy"] == 0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["eval_reward_margin"] > 0
    assert (run / "model.safetensors").exists()
