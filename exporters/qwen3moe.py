"""Cortex as Qwen3-MoE: the one weight mapping every export uses (spec/export.md).

Qwen3-MoE has no shared expert, but with renormalised top-k weights (they sum to 1) adding the always-on shared expert
S to every routed expert E_e computes the same thing: w1*(E1+S) + w2*(E2+S) = w1*E1 + w2*E2 + S. So each routed expert
becomes [own; shared] stacked along its intermediate dimension. Everything else is a rename.
"""

import torch

from model import CortexModel, ModelConfig
from model.rope import yarn_factor_and_original_length

ARCHITECTURE = "Qwen3MoeForCausalLM"
RENAMES = ((".attn_norm.", ".input_layernorm."), (".mlp_norm.", ".post_attention_layernorm."), (".attn.", ".self_attn."))
EXPERT_CONCAT_DIM = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}  # (I, H) weights stack rows, (H, I) columns


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no exact Qwen3-MoE equivalent; the message says which setting."""


def check_exportable(config: ModelConfig) -> None:
    """Raise UnsupportedModelError for a config whose function Qwen3-MoE cannot reproduce exactly."""
    problems = []
    moe = config.moe_config
    if moe is None:
        problems.append("it has no experts (moe_config is null); only Cortex MoE checkpoints are exported")
    else:
        if moe.routed_scaling_factor != 1.0:
            problems.append(f"moe_config.routed_scaling_factor={moe.routed_scaling_factor} (Qwen3-MoE has none; 1.0 needed)")
        if moe.n_shared_experts and not (moe.norm_topk_prob and moe.num_experts_per_tok > 1):
            problems.append("a shared expert folds into the routed ones only when the top-k weights are renormalised "
                            "(norm_topk_prob=true and num_experts_per_tok > 1)")
        if moe.norm_topk_prob and moe.num_experts_per_tok == 1:
            problems.append("norm_topk_prob with one expert per token: Cortex skips the renormalisation, Qwen3-MoE does not")
    if not config.use_qk_norm:
        problems.append("use_qk_norm=false (Qwen3-MoE always normalises q and k)")
    if problems:
        raise UnsupportedModelError("this checkpoint cannot be exported as Qwen3-MoE: " + "; ".join(problems))


def expert_width(config: ModelConfig) -> int:
    """Intermediate width of a folded routed expert: its own plus the shared expert's."""
    moe = config.moe_config
    return moe.intermediate_size * (1 + moe.n_shared_experts)


def rope_scaling(config: ModelConfig) -> dict | None:
    """Hugging Face's rope_scaling for the config; the original length must be explicit (without it the logits move)."""
    rope = config.rope_config
    if rope.rope_type == "default":
        return None
    factor, original_length = yarn_factor_and_original_length(config)
    scaling = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original_length,
               "beta_fast": float(rope.beta_fast or 32), "beta_slow": float(rope.beta_slow or 1)}
    for name in ("mscale", "mscale_all_dim", "attention_factor"):
        if getattr(rope, name) is not None:
            scaling[name] = getattr(rope, name)
    return scaling


def hf_config(config: ModelConfig, rms_norm_eps: float) -> dict:
    """Qwen3MoeConfig keyword arguments for a Cortex config (tokenizer ids and dtype are the writer's)."""
    check_exportable(config)
    moe = config.moe_config
    return dict(
        architectures=[ARCHITECTURE], vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, moe_intermediate_size=expert_width(config),
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=rms_norm_eps,
        rope_theta=config.rope_config.rope_theta, rope_scaling=rope_scaling(config), attention_bias=False,
        attention_dropout=config.attention_dropout, tie_word_embeddings=False, num_experts=moe.n_routed_experts,
        num_experts_per_tok=moe.num_experts_per_tok, norm_topk_prob=moe.norm_topk_prob, decoder_sparse_step=1,
        mlp_only_layers=list(range(moe.n_dense_layer)), use_sliding_window=False)


def hf_state_dict(model: CortexModel) -> dict[str, torch.Tensor]:
    """Qwen3-MoE tensors (Hugging Face names, model dtype) of a Cortex model, the shared expert folded into each routed
    expert."""
    config = model.config
    check_exportable(config)
    source = model.state_dict()
    out = {"model.embed_tokens.weight": source.pop("embed_tokens.weight"),
           "model.norm.weight": source.pop("head_norm.weight"), "lm_head.weight": source.pop("lm_head.weight")}
    moe = config.moe_config
    for layer in range(config.num_hidden_layers):
        prefix = f"layers.{layer}.mlp."
        if not config.is_moe_layer(layer):
            continue
        shared = {name: source.pop(f"{prefix}shared_experts.{name}.weight")
                  for name in EXPERT_CONCAT_DIM} if moe.n_shared_experts else {}
        for expert in range(moe.n_routed_experts):
            for name, dim in EXPERT_CONCAT_DIM.items():
                weight = source.pop(f"{prefix}experts.{expert}.{name}.weight")
                if shared:
                    weight = torch.cat([weight, shared[name]], dim=dim)
                out[f"model.{prefix}experts.{expert}.{name}.weight"] = weight
    for key, tensor in source.items():  # attention, norms, router, dense MLPs: renamed only
        for old, new in RENAMES:
            key = key.replace(old, new)
        out[f"model.{key}"] = tensor
    return out
