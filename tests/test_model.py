"""model/: architecture contract (spec/model.md), numerics, masks, KV cache, MoE and mixed precision. CPU, tiny configs."""

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model import (
    CortexModel,
    KVCache,
    ModelConfig,
    MoEConfig,
    RoPEConfig,
    cortex_2_5_config,
    count_parameters,
    tiny_config,
)
from model.moe import MoE, RoutedExperts, unstack_expert_weights
from model.norm import RMSNorm
from model.rope import RotaryEmbedding, rope_inv_freq

VOCAB = 101


def tiny_model(seed: int = 0, **config_overrides) -> CortexModel:
    torch.manual_seed(seed)
    config = tiny_config(VOCAB)
    for name, value in config_overrides.items():
        setattr(config, name, value)
    return CortexModel(config)


def expected_cortex_shapes() -> dict[str, tuple[int, ...]]:
    """The 842 keys and shapes of spec section 3, written out from the spec's tables."""
    shapes = {"embed_tokens.weight": (46957, 768)}
    attention = {
        "attn_norm.weight": (768,),
        "attn.q_proj.weight": (768, 768),
        "attn.k_proj.weight": (256, 768),
        "attn.v_proj.weight": (256, 768),
        "attn.o_proj.weight": (768, 768),
        "attn.q_norm.weight": (64,),
        "attn.k_norm.weight": (64,),
        "mlp_norm.weight": (768,),
    }
    for layer in range(24):
        shapes |= {f"layers.{layer}.{name}": shape for name, shape in attention.items()}
        if layer == 0:
            shapes |= {
                "layers.0.mlp.gate_proj.weight": (2048, 768),
                "layers.0.mlp.up_proj.weight": (2048, 768),
                "layers.0.mlp.down_proj.weight": (768, 2048),
            }
            continue
        for expert in range(8):
            prefix = f"layers.{layer}.mlp.experts.{expert}"
            shapes |= {
                f"{prefix}.gate_proj.weight": (1024, 768),
                f"{prefix}.up_proj.weight": (1024, 768),
                f"{prefix}.down_proj.weight": (768, 1024),
            }
        shapes[f"layers.{layer}.mlp.gate.weight"] = (8, 768)
        shapes |= {
            f"layers.{layer}.mlp.shared_experts.gate_proj.weight": (1024, 768),
            f"layers.{layer}.mlp.shared_experts.up_proj.weight": (1024, 768),
            f"layers.{layer}.mlp.shared_experts.down_proj.weight": (768, 1024),
        }
    shapes["head_norm.weight"] = (768,)
    shapes["lm_head.weight"] = (46957, 768)
    return shapes


# ---------------------------------------------------------------- config, state dict, parameter counts


@pytest.mark.parametrize("long_context", [False, True])
def test_full_cortex_config_has_the_842_published_keys_and_shapes(long_context):
    with torch.device("meta"):
        model = CortexModel(cortex_2_5_config(long_context))
    state = model.state_dict()
    expected = expected_cortex_shapes()
    assert len(state) == 842
    assert list(state) == list(expected)  # same order as the reference's state dict
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(v.numel() for v in state.values()) == 603_149_568
    assert "rotary_emb.inv_freq" not in state  # non-persistent buffer


def test_parameter_counts_of_the_full_config():
    for long_context in (False, True):
        counts = count_parameters(cortex_2_5_config(long_context))
        assert counts.total == 603_149_568
        assert counts.active == 205_440_768


def test_count_parameters_agrees_with_instantiated_models():
    dense_config = replace(cortex_2_5_config(), moe_config=None)
    for config in (tiny_config(VOCAB), dense_config):
        with torch.device("meta"):
            model = CortexModel(config)
        assert count_parameters(config).total == sum(p.numel() for p in model.parameters())
    dense = count_parameters(dense_config)
    assert dense.active == dense.total - 2 * 46957 * 768  # no experts: everything but the embeddings is active


def test_cortex_presets():
    stage0, long = cortex_2_5_config(False), cortex_2_5_config(True)
    assert (stage0.max_position_embeddings, stage0.original_max_position_embeddings) == (512, None)
    assert (long.max_position_embeddings, long.original_max_position_embeddings) == (2048, 512)
    assert (stage0.rope_config.rope_type, long.rope_config.rope_type) == ("default", "yarn")
    assert stage0.rope_config.rope_theta == 1e6 and stage0.attention_dropout == 0.1


def test_tiny_config_has_the_cortex_structure():
    model = tiny_model()
    assert not model.layers[0].is_moe
    for layer in model.layers[1:]:
        assert layer.is_moe and layer.mlp.shared_experts is not None
        assert layer.mlp.experts.num_experts == 4 and layer.mlp.top_k == 2


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=3, max_position_embeddings=16)
    with pytest.raises(ValueError, match="rope_type"):
        RoPEConfig(rope_type="dynamic")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoEConfig(intermediate_size=8, n_dense_layer=0, num_experts_per_tok=3, n_shared_experts=1, n_routed_experts=2)
    with pytest.raises(ValueError, match="attention_implementation"):
        ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                    max_position_embeddings=16, attention_implementation="eager")


def test_init_follows_the_reference_scheme():
    model = tiny_model()
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.head_norm.weight, torch.ones(64))
    router = model.layers[1].mlp.gate.weight  # kaiming-uniform U(-1/sqrt(H), 1/sqrt(H)), not re-drawn
    assert router.abs().max().item() <= 1 / math.sqrt(64) and router.std().item() > 0.05


# ---------------------------------------------------------------- RoPE


def test_yarn_frequency_ratios_and_attention_factor_of_cortex_long_context():
    long_config, default_config = cortex_2_5_config(True), cortex_2_5_config(False)
    ratios = (rope_inv_freq(long_config) / rope_inv_freq(default_config)).tolist()
    expected = [1, 1, 1, 11 / 12, 10 / 12, 9 / 12, 8 / 12, 7 / 12, 6 / 12, 5 / 12, 4 / 12] + [0.25] * 21
    assert ratios == pytest.approx(expected, abs=1e-6)
    assert RotaryEmbedding(long_config).attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    assert RotaryEmbedding(default_config).attention_scaling == 1.0
    theta_exponents = torch.arange(0, 64, 2).float() / 64
    assert torch.equal(rope_inv_freq(default_config), 1.0 / (1e6**theta_exponents))


def test_inv_freq_stays_fp32_when_the_model_is_cast():
    model = tiny_model(rope_config=RoPEConfig(rope_type="yarn", rope_theta=1e6), original_max_position_embeddings=64)
    reference = model.rotary_emb.inv_freq.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(model)
        assert model.rotary_emb.inv_freq.dtype == torch.float32
        assert torch.equal(model.rotary_emb.inv_freq, reference)
    assert model.lm_head.weight.dtype == torch.float32


def test_rope_is_relative_so_shifted_positions_give_the_same_logits():
    model = tiny_model().eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    base = model(ids)["logits"]
    shifted = model(ids, position_ids=torch.arange(30, 42)[None])["logits"]
    torch.testing.assert_close(shifted, base, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- forward, masks, logits_to_keep


def test_forward_returns_the_reference_dict():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 7))
    out = model.eval()(ids)
    assert set(out) == {"logits", "aux_loss", "past_key_values"}
    assert out["logits"].shape == (2, 7, VOCAB) and out["aux_loss"] is None and out["past_key_values"] is None
    out = model.train()(ids)
    assert out["aux_loss"].shape == () and out["aux_loss"].dtype == torch.float32
    assert model(ids, use_cache=True)["past_key_values"].get_seq_len() == 7


def test_logits_to_keep_returns_the_last_positions():
    model = tiny_model().eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    full = model(ids)["logits"]
    torch.testing.assert_close(model(ids, logits_to_keep=1)["logits"], full[:, -1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids, logits_to_keep=4)["logits"], full[:, -4:], atol=1e-6, rtol=0)


def test_is_causal_fast_path_equals_the_explicit_mask_path():
    model = tiny_model().eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    fast = model(ids)["logits"]
    all_true = torch.ones(2, 1, 10, 10, dtype=torch.bool)  # forces the materialised-mask path
    torch.testing.assert_close(model(ids, doc_boundary_mask=all_true)["logits"], fast, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids, attention_mask=torch.ones(2, 10))["logits"], fast, atol=0, rtol=0)


def test_the_future_never_leaks_into_the_past():
    model = tiny_model().eval()
    ids = torch.randint(0, VOCAB, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % VOCAB
    torch.testing.assert_close(model(changed)["logits"][:, :6], model(ids)["logits"][:, :6], atol=1e-6, rtol=0)


def doc_masks(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) document ids -> (bool mask True = same-or-later doc may attend, the reference's additive float mask)."""
    allowed = (doc_ids[:, :, None] <= doc_ids[:, None, :])[:, None]  # query doc <= key doc (later keys are causal)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return allowed, additive


def test_packed_documents_attend_only_within_their_document():
    model = tiny_model().eval()
    doc_a, doc_b = torch.randint(0, VOCAB, (1, 5)), torch.randint(0, VOCAB, (1, 7))
    packed = torch.cat((doc_a, doc_b), dim=1)
    position_ids = torch.cat((torch.arange(5), torch.arange(7)))[None]
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    bool_mask, float_mask = doc_masks(doc_ids)
    out_bool = model(packed, position_ids=position_ids, doc_boundary_mask=bool_mask)["logits"]
    out_float = model(packed, position_ids=position_ids, doc_boundary_mask=float_mask)["logits"]
    torch.testing.assert_close(out_bool, out_float, atol=0, rtol=0)
    torch.testing.assert_close(out_bool[:, :5], model(doc_a)["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out_bool[:, 5:], model(doc_b)["logits"], atol=1e-5, rtol=0)


def test_mask_shape_errors_name_the_argument():
    model = tiny_model().eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="doc_boundary_mask"):
        model(ids, doc_boundary_mask=torch.ones(2, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(4)[None])


# ---------------------------------------------------------------- KV cache and padding


@pytest.mark.parametrize("max_length", [None, 32])
def test_kv_cache_decoding_and_chunked_prefill_match_the_full_forward(max_length):
    model = tiny_model().eval()
    ids = torch.randint(0, VOCAB, (2, 14))
    full = model(ids)["logits"]

    cache = KVCache(max_length=max_length)
    chunks = [model(ids[:, :5], past_key_values=cache)["logits"]]  # prefill
    chunks.append(model(ids[:, 5:9], past_key_values=cache)["logits"])  # chunked prefill: T > 1 with a past
    for t in range(9, 14):  # token by token
        chunks.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)["logits"])
    assert cache.get_seq_len() == 14
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_fixed_size_cache_overflow_and_prefill_in_parts():
    model = tiny_model().eval()
    ids = torch.randint(0, VOCAB, (1, 6))
    cache = KVCache(max_length=6)
    model(ids, past_key_values=cache)
    with pytest.raises(RuntimeError, match="max_length=6"):
        model(ids[:, :1], past_key_values=cache)
    for cache in (KVCache(max_length=8), KVCache()):
        model(ids[:, :3], past_key_values=cache)
        again = model(ids[:, 3:], past_key_values=cache)["logits"]
        torch.testing.assert_close(again, model(ids)["logits"][:, 3:], atol=1e-5, rtol=0)


def test_left_padded_rows_equal_the_same_rows_alone_in_prefill_and_decoding():
    model = tiny_model().eval()
    short, long = torch.randint(0, VOCAB, (1, 4)), torch.randint(0, VOCAB, (1, 7))
    continuation = torch.randint(0, VOCAB, (2, 3))
    batch = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), dim=1), long))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(max_length=10)
    prefill = model(batch, attention_mask=mask, position_ids=positions, past_key_values=cache)["logits"]
    torch.testing.assert_close(prefill[0:1, 3:], model(short)["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefill[1:2], model(long)["logits"], atol=1e-5, rtol=0)
    assert torch.isfinite(prefill).all()  # fully masked padding rows give no NaN

    steps = []
    for t in range(3):
        mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.bool)), dim=1)
        positions = positions[:, -1:] + 1
        steps.append(model(continuation[:, t : t + 1], attention_mask=mask, position_ids=positions,
                           past_key_values=cache)["logits"])
    steps = torch.cat(steps, dim=1)
    torch.testing.assert_close(steps[0:1], model(torch.cat((short, continuation[0:1]), 1))["logits"][:, 4:],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(steps[1:2], model(torch.cat((long, continuation[1:2]), 1))["logits"][:, 7:],
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------- MoE


def moe_only_config(seq_aux: bool = True) -> ModelConfig:
    return ModelConfig(
        vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        max_position_embeddings=16,
        moe_config=MoEConfig(intermediate_size=3, n_dense_layer=0, num_experts_per_tok=2, n_shared_experts=1,
                             n_routed_experts=4, seq_aux=seq_aux, norm_topk_prob=True),
    )


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_on_a_hand_computed_example(seq_aux):
    # Router weight = identity, so token x = (ln a) e_i + (ln b) e_j has scores a, b, 1, 1 (over a + b + 2) and picks {i, j}
    moe = MoE(moe_only_config(seq_aux)).train()
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(4))
    tokens = [[(0, 1, 3.0, 2.0), (0, 2, 4.0, 2.0), (0, 1, 2.0, 3.0)],  # sequence 0: (i, j, a, b) per token
              [(2, 3, 5.0, 3.0), (1, 3, 2.0, 2.5), (0, 3, 3.0, 4.0)]]  # sequence 1
    x = torch.zeros(2, 3, 4)
    scores = [[[0.0] * 4 for _ in range(3)] for _ in range(2)]
    for b, row in enumerate(tokens):
        for t, (i, j, a, c) in enumerate(row):
            x[b, t, i], x[b, t, j] = math.log(a), math.log(c)
            for e in range(4):
                scores[b][t][e] = {i: a, j: c}.get(e, 1.0) / (a + c + 2)
    counts = [[sum(e in (i, j) for i, j, _, _ in row) for e in range(4)] for row in tokens]
    if seq_aux:  # f = count * E / (T * K), P = mean over the sequence, sum over experts, mean over sequences
        expected = sum(
            sum(counts[b][e] * 4 / (3 * 2) * sum(scores[b][t][e] for t in range(3)) / 3 for e in range(4))
            for b in range(2)
        ) / 2
    else:  # f = E * share of all N*K assignments, P = mean over all tokens
        expected = sum(
            (counts[0][e] + counts[1][e]) / 12 * 4 * sum(scores[b][t][e] for b in range(2) for t in range(3)) / 6
            for e in range(4)
        )
    _, aux = moe(x)
    assert aux.item() == pytest.approx(expected, rel=1e-6)
    assert moe.eval()(x)[1] is None


@pytest.mark.parametrize("gather_experts", [False, True])
def test_moe_output_equals_a_per_token_loop(gather_experts):
    torch.manual_seed(0)
    moe = MoE(tiny_config(VOCAB)).eval()
    x = torch.randn(2, 5, 64)
    out, _ = moe(x, gather_experts=gather_experts)
    stacks = moe.experts

    def expert(e, v):
        return F.linear(F.silu(F.linear(v, stacks.gate_proj[e])) * F.linear(v, stacks.up_proj[e]), stacks.down_proj[e])

    expected = torch.zeros_like(x)
    for b in range(2):
        for t in range(5):
            scores = F.linear(x[b, t], moe.gate.weight).softmax(-1)
            weights, experts = scores.topk(2)
            weights = weights / weights.sum()
            for w, e in zip(weights, experts):
                expected[b, t] += w * expert(int(e), x[b, t])
            expected[b, t] += moe.shared_experts(x[b, t])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_model_aux_loss_is_the_unscaled_sum_over_moe_layers():
    model = tiny_model().train()
    per_layer = []
    for layer in model.layers[1:]:
        layer.mlp.register_forward_hook(lambda module, args, output: per_layer.append(output[1]))
    out = model(torch.randint(0, VOCAB, (2, 8)))
    assert len(per_layer) == 2
    torch.testing.assert_close(out["aux_loss"], per_layer[0] + per_layer[1], atol=0, rtol=0)
    assert 0.9 < per_layer[0].item() < 4.0  # ~1 for a balanced router, E at worst


def test_gradients_reach_the_router_and_the_experts_module_runs_in_every_moe_layer():
    # ZeRO-3 gathers the experts around the experts module's forward, so every rank must call it, whatever its tokens
    model = tiny_model().train()
    calls = []
    for layer in model.layers[1:]:
        layer.mlp.experts.register_forward_hook(lambda module, args, output: calls.append(module))
    out = model(torch.randint(0, VOCAB, (1, 1)))  # one token reaches only 2 of the 4 experts per layer
    assert len(calls) == 2
    (out["logits"].sum() + out["aux_loss"]).backward()
    for layer in model.layers[1:]:
        assert layer.mlp.gate.weight.grad.abs().sum() > 0
        per_expert = [layer.mlp.experts.gate_proj.grad[e].abs().sum().item() for e in range(4)]
        assert sum(g > 0 for g in per_expert) == 2  # exactly the token's 2 experts get a gradient, the others zero
        for weight in (layer.mlp.experts.up_proj, layer.mlp.experts.down_proj):
            assert sum(weight.grad[e].abs().sum().item() > 0 for e in range(4)) == 2


# ---------------------------------------------------------------- mixed precision


def test_training_under_bf16_autocast_works():
    model = tiny_model().train()
    ids = torch.randint(0, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :2] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask)
        loss = F.cross_entropy(out["logits"].float().view(-1, VOCAB), ids.view(-1)) + 0.001 * out["aux_loss"]
    loss.backward()
    assert torch.isfinite(loss) and out["aux_loss"].dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in model.parameters())
    reference = tiny_model().eval()(ids, attention_mask=mask)["logits"]
    assert (out["logits"].float() - reference)[:, 2:].abs().max() < 0.05


def test_training_with_the_whole_model_in_bf16_works():
    model = tiny_model().to(torch.bfloat16).train()
    ids = torch.randint(0, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    out = model(ids, attention_mask=mask)
    assert out["logits"].dtype == torch.bfloat16 and torch.isfinite(out["logits"].float()).all()
    (F.cross_entropy(out["logits"].float().view(-1, VOCAB), ids.view(-1)) + out["aux_loss"]).backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters())
    assert model.rotary_emb.inv_freq.dtype == torch.float32


def test_config_round_trips_through_a_plain_dict():
    for config in (cortex_2_5_config(True), replace(cortex_2_5_config(), moe_config=None), tiny_config(VOCAB)):
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown ModelConfig fields \\['head_dim'\\]"):
        ModelConfig.from_dict(tiny_config(VOCAB).to_dict() | {"head_dim": 64})


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "autocast-bf16", "bf16"])
def test_the_routed_experts_have_the_outputs_and_gradients_of_per_expert_linear_layers(precision, grouped, monkeypatch):
    torch.manual_seed(0)
    experts = RoutedExperts(4, 16, 8)
    monkeypatch.setattr(experts, "_grouped_mm_fits", lambda rows: grouped)  # torch._grouped_mm, or the loop
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    experts.to(dtype)
    tokens = torch.randn(5, 16, dtype=dtype, requires_grad=True)
    expert_idx = torch.tensor([[0, 2], [3, 2], [2, 0], [0, 3], [2, 3]])  # expert 1 gets no tokens
    upstream = torch.randn(5, 2, 16)
    weights = [experts.gate_proj, experts.up_proj, experts.down_proj]

    def per_expert_linear_layers():
        gate, up, down = (w.unbind(0) for w in weights)
        return torch.stack([torch.stack([F.linear(F.silu(F.linear(tokens[n], gate[e])) * F.linear(tokens[n], up[e]),
                                                  down[e]) for e in expert_idx[n].tolist()]) for n in range(5)])

    results = []
    for run in (lambda: experts(tokens, expert_idx), per_expert_linear_layers):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast-bf16"):
            out = run()
        grads = torch.autograd.grad((out.float() * upstream).sum(), [tokens, *weights])
        results.append((out, grads))
    (ours, our_grads), (plain, plain_grads) = results
    assert ours.shape == (5, 2, 16) and ours.dtype == plain.dtype
    tol = 1e-6 if precision == "fp32" else 2e-2
    torch.testing.assert_close(ours.float(), plain.float(), atol=tol, rtol=tol)
    for got, want in zip(our_grads, plain_grads):
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).norm() <= tol * want.float().norm()
    assert our_grads[1][1].abs().sum() == 0  # the expert without tokens


def test_the_grouped_product_is_used_where_rows_are_aligned():
    experts = RoutedExperts(4, 16, 8)
    assert experts._grouped_mm_fits(torch.zeros(3, 16))  # 16 x 4 bytes, 8 x 4 bytes
    assert not RoutedExperts(4, 16, 6)._grouped_mm_fits(torch.zeros(3, 16))  # 24 bytes: not 16-byte aligned


def test_parameters_named_by_deepspeed_map_to_the_published_keys():
    model = tiny_model()
    by_parameter_name = {name: param.detach() for name, param in model.named_parameters()}
    assert "layers.1.mlp.experts.gate_proj" in by_parameter_name  # stacked (experts, intermediate, hidden)
    state = model.state_dict()
    converted = unstack_expert_weights(by_parameter_name)
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)


def test_the_experts_module_is_called_once_per_moe_layer_in_inference_too():
    # one call per layer on every rank, whatever the tokens: what DeepSpeed ZeRO-3's parameter gathering needs
    model = tiny_model().eval()
    calls = []
    for layer in model.layers[1:]:
        layer.mlp.experts.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    with torch.no_grad():
        for ids in (torch.randint(0, VOCAB, (1, 1)), torch.randint(0, VOCAB, (2, 3))):
            calls.clear()
            model(ids)
            assert calls == [(ids.numel(), 2, 64)] * 2


def test_rmsnorm_normalises_in_fp32_then_casts_back_then_scales():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    plain = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
    torch.testing.assert_close(norm(x), plain, atol=1e-6, rtol=0)
    low = x.to(torch.bfloat16)
    expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)).to(torch.bfloat16)
    assert norm(low).dtype == torch.float32  # fp32 weight x bf16 value
    torch.testing.assert_close(norm(low), expected, atol=2e-2, rtol=0)
