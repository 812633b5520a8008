"""The chunked target-scoring head equals log_softmax over full logits, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

import model.head as head
from model import CortexModel, tiny_config
from model.head import IGNORE_INDEX, target_log_probs


@pytest.fixture
def small_chunks(monkeypatch):
    # 5 positions per chunk for a 64-token vocabulary, so every test crosses chunk boundaries (and a ragged last one)
    monkeypatch.setattr(head, "CHUNK_ELEMENTS", 5 * 64)


def _plain(hidden, weight, targets):
    log_probs = F.linear(hidden, weight).float().log_softmax(-1)
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return torch.where(targets == IGNORE_INDEX, 0.0, picked), entropy


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(64, 16, generator=gen, dtype=dtype).requires_grad_()
    targets = torch.randint(0, 64, (3, 7), generator=gen)
    targets[0, :2] = IGNORE_INDEX
    targets[2, -1] = IGNORE_INDEX
    return hidden, weight, targets


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("summed", [False, True])
def test_log_probs_entropy_and_gradients_equal_the_full_logits_path(small_chunks, summed, with_entropy):
    hidden, weight, targets = _inputs()
    expected, expected_entropy = _plain(hidden, weight, targets)
    log_probs, entropy = target_log_probs(hidden, weight, targets, with_entropy=with_entropy, summed=summed)
    if with_entropy:
        assert torch.allclose(entropy, expected_entropy, atol=1e-5) and not entropy.requires_grad
    else:
        assert entropy is None
    if summed:  # gradients formed in forward, scaled by the upstream gradient in backward
        assert log_probs.shape == () and torch.allclose(log_probs, expected.sum(), atol=1e-4)
        upstream, expected_loss = -0.37, -0.37 * expected.sum()
        ours = _grads(upstream * log_probs, hidden, weight)
    else:  # logits computed again in backward
        assert log_probs.shape == (3, 7) and torch.allclose(log_probs, expected, atol=1e-5)
        assert (log_probs[targets == IGNORE_INDEX] == 0).all()
        upstream = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))  # any per-position gradient
        expected_loss = (upstream * expected).sum()
        ours = _grads((upstream * log_probs).sum(), hidden, weight)
    for got, want in zip(ours, _grads(expected_loss, hidden, weight)):
        assert torch.allclose(got, want, atol=1e-5)


def test_no_gradients_are_formed_without_autograd(small_chunks):
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        total, _ = target_log_probs(hidden, weight, targets, summed=True)
    assert not total.requires_grad
    assert torch.allclose(total, _plain(hidden, weight, targets)[0].sum(), atol=1e-4)


def test_autocast_projects_in_bf16_and_scores_in_fp32(small_chunks):
    hidden, weight, targets = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs, _ = target_log_probs(hidden, weight, targets)
        logits = F.linear(hidden, weight)  # what nn.Linear gives under autocast
    assert log_probs.dtype == torch.float32
    expected = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    assert torch.allclose(log_probs, torch.where(targets == IGNORE_INDEX, 0.0, expected), atol=1e-5)
    grad_weight, = _grads(log_probs.sum(), weight)
    assert grad_weight.dtype == torch.float32


@pytest.mark.parametrize("summed", [False, True])
def test_a_bf16_model_scores_in_fp32_and_gets_the_plain_paths_bf16_gradients(small_chunks, summed):
    hidden, weight, targets = _inputs(torch.bfloat16)
    expected, _ = _plain(hidden, weight, targets)  # bf16 logits, scored in fp32
    upstream = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    log_probs, _ = target_log_probs(hidden, weight, targets, summed=summed)
    assert log_probs.dtype == torch.float32
    if summed:
        assert torch.allclose(log_probs, expected.sum(), atol=1e-3)
        ours, want = _grads(-log_probs, hidden, weight), _grads(-expected.sum(), hidden, weight)
    else:
        assert torch.allclose(log_probs, expected, atol=1e-5)
        ours, want = _grads((upstream * log_probs).sum(), hidden, weight), _grads((upstream * expected).sum(), hidden, weight)
    for got, wanted in zip(ours, want):
        assert got.dtype == torch.bfloat16
        # one bf16 rounding of each gradient apart (the plain path rounds its logits' gradient to bf16 as well)
        assert (got.float() - wanted.float()).norm() <= 1e-2 * wanted.float().norm()


def test_target_shape_must_match_the_positions_and_scoring_options_need_targets():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match=r"targets has shape \(3, 6\), expected \(3, 7\)"):
        target_log_probs(hidden, weight, targets[:, :6])
    model = CortexModel(tiny_config(64))
    with pytest.raises(ValueError, match="pass targets"):
        model(torch.zeros(1, 4, dtype=torch.long), return_entropy=True)


def test_model_scores_targets_like_its_logits(small_chunks):
    torch.manual_seed(0)
    model = CortexModel(tiny_config(64)).train()
    ids = torch.randint(0, 64, (2, 9))
    targets = F.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX)
    full = model(ids)
    scored = model(ids, targets=targets, return_entropy=True)
    assert scored["logits"] is None and torch.equal(scored["aux_loss"], full["aux_loss"])
    expected = F.cross_entropy(full["logits"][:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1), reduction="none")
    assert torch.allclose(-scored["target_log_probs"][:, :-1].reshape(-1), expected, atol=1e-5)
    kept = model(ids, logits_to_keep=3, targets=targets[:, -3:], sum_target_log_probs=True)["target_log_probs"]
    assert torch.allclose(kept, scored["target_log_probs"][:, -3:].sum(), atol=1e-5)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("summed", [False, True])
def test_targets_too_unlikely_for_their_softmax_probability_still_get_exact_log_probs(small_chunks, summed, with_entropy):
    # Logit gaps of a few hundred: p_t underflows fp32, so log p_t must come from the logits, not from the softmax
    hidden, weight, targets = _inputs()
    hidden = (hidden.detach() * 40).requires_grad_()
    expected, expected_entropy = _plain(hidden, weight, targets)
    assert expected.min() < -200  # some targets' probabilities are far below fp32's smallest (about 1e-45)
    log_probs, entropy = target_log_probs(hidden, weight, targets, with_entropy=with_entropy, summed=summed)
    assert torch.allclose(log_probs, expected.sum() if summed else expected, rtol=1e-5, atol=1e-4)
    if with_entropy:
        assert torch.allclose(entropy, expected_entropy, atol=1e-4)
    ours = _grads(log_probs.sum(), hidden, weight)
    for got, wanted in zip(ours, _grads(expected.sum(), hidden, weight)):
        assert torch.allclose(got, wanted, atol=1e-4)


def test_a_summed_score_can_be_backpropagated_twice():
    hidden, weight, targets = _inputs()
    total, _ = target_log_probs(hidden, weight, targets, summed=True)
    once = torch.autograd.grad(total, (hidden, weight), retain_graph=True)
    total.backward(retain_graph=True)
    total.backward()  # the gradients formed in forward are scaled out of place: the same again
    for got, want in zip((hidden.grad, weight.grad), once):
        assert torch.allclose(got, 2 * want, atol=1e-6)
