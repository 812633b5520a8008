"""Large CPU gradients are written into memory kept from the previous step, and never into memory someone still holds."""

import torch

import model.buffers as buffers
from model import CortexModel, tiny_config
from model.embedding import TokenEmbedding


def _cross_entropy_step(model, ids):
    out = model(ids[:, :-1], targets=ids[:, 1:], sum_target_log_probs=True)
    (-out["target_log_probs"]).backward()


def test_the_embedding_gradient_equals_torchs():
    torch.manual_seed(0)
    ours = TokenEmbedding(50, 8)
    plain = torch.nn.Embedding(50, 8)
    plain.load_state_dict(ours.state_dict())
    ids = torch.tensor([[3, 7, 3, 49], [0, 3, 7, 7]])  # repeated tokens: their gradients add up
    upstream = torch.randn(2, 4, 8)
    (ours(ids) * upstream).sum().backward()
    (plain(ids) * upstream).sum().backward()
    assert torch.equal(ours(ids), plain(ids))
    assert torch.allclose(ours.weight.grad, plain.weight.grad, atol=1e-6)
    assert (ours.weight.grad[[1, 2, 4]] == 0).all()


def test_gradients_reuse_the_last_steps_memory_once_it_is_dropped():
    torch.manual_seed(0)
    model = CortexModel(tiny_config(64)).train()
    ids = torch.randint(0, 64, (2, 9))
    big = (model.embed_tokens.weight, model.lm_head.weight)
    pointers = []
    for _ in range(3):
        _cross_entropy_step(model, ids)
        pointers.append([weight.grad.data_ptr() for weight in big])
        model.zero_grad(set_to_none=True)
    assert pointers[0] == pointers[1] == pointers[2]


def test_a_gradient_still_held_is_never_overwritten():
    torch.manual_seed(0)
    model = CortexModel(tiny_config(64)).train()
    ids = torch.randint(0, 64, (2, 9))
    big = (model.embed_tokens.weight, model.lm_head.weight)
    _cross_entropy_step(model, ids)
    held = [weight.grad for weight in big]  # e.g. kept for logging after zero_grad
    copies = [grad.clone() for grad in held]
    model.zero_grad(set_to_none=True)
    _cross_entropy_step(model, torch.randint(0, 64, (2, 9)))
    for grad, copy, weight in zip(held, copies, big):
        assert torch.equal(grad, copy) and weight.grad.data_ptr() != grad.data_ptr()


def test_gradients_accumulated_over_two_backward_passes_add_up():
    torch.manual_seed(0)
    model = CortexModel(tiny_config(64)).train()
    ids = torch.randint(0, 64, (2, 9))
    _cross_entropy_step(model, ids)
    _cross_entropy_step(model, ids)  # no zero_grad: .grad is the recycled tensor, added to in place
    twice = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = model(ids[:, :-1], targets=ids[:, 1:], sum_target_log_probs=True)
    (-2 * out["target_log_probs"]).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(twice[name], p.grad, atol=1e-6), name


def test_recycled_hands_out_a_view_and_a_new_tensor_while_the_last_one_is_held():
    device = torch.device("cpu")
    first = buffers.recycled("test_buffer", (4, 3), torch.float32, device)
    second = buffers.recycled("test_buffer", (4, 3), torch.float32, device)  # `first` is still alive
    assert first.data_ptr() != second.data_ptr()
    pointer = second.data_ptr()
    del first, second
    third = buffers.recycled("test_buffer", (4, 3), torch.float32, device)
    assert third.data_ptr() == pointer  # nothing held it any more
    view = third[1:]
    del third
    assert buffers.recycled("test_buffer", (4, 3), torch.float32, device).data_ptr() != pointer  # a view holds it
