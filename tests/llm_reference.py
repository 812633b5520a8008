"""Our ModelConfig as a config of the reference implementation llm_model 0.6.0 (PyPI project-llm-model), for the
parity tests and bench/bench_model.py. Only importable where llm_model is installed."""
import llm_model

from model import ModelConfig


def reference_config(config: ModelConfig) -> "llm_model.ModelConfig":
    moe = config.moe_config
    return llm_model.ModelConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        original_max_position_embeddings=config.original_max_position_embeddings,
        attention_dropout=config.attention_dropout,
        rope_config=llm_model.RoPEConfig(rope_type=config.rope_config.rope_type, rope_theta=config.rope_config.rope_theta),
        moe_config=llm_model.MoEConfig(
            intermediate_size=moe.intermediate_size,
            n_dense_layer=moe.n_dense_layer,
            num_experts_per_tok=moe.num_experts_per_tok,
            n_shared_experts=moe.n_shared_experts,
            n_routed_experts=moe.n_routed_experts,
            seq_aux=moe.seq_aux,
            norm_topk_prob=moe.norm_topk_prob,
        ),
    )
