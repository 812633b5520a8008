"""Model configuration: dataclasses with the field names of the reference `llm_model` 0.6.0 (a config written for it
builds the same network here), Cortex presets, parameter counts."""

from dataclasses import asdict, dataclass, field, fields, replace


@dataclass(kw_only=True)
class RoPEConfig:
    rope_type: str = "default"  # 'default' or 'yarn'
    rope_theta: float = 10000.0
    factor: float = 1.0  # yarn only; ignored when ModelConfig.original_max_position_embeddings is set
    partial_rotary_factor: float = 1.0  # kept for config compatibility; only full rotation (1.0) is supported
    beta_fast: float = 32
    beta_slow: float = 1
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None

    def __post_init__(self):
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"RoPEConfig.rope_type={self.rope_type!r} is not supported; use 'default' or 'yarn'")
        if self.partial_rotary_factor != 1.0:
            raise ValueError(f"RoPEConfig.partial_rotary_factor={self.partial_rotary_factor} is not supported; "
                             "Cortex rotates the full head dimension, set it to 1.0")


@dataclass(kw_only=True)
class MoEConfig:
    intermediate_size: int  # width of each routed expert
    n_dense_layer: int  # the first n layers use the dense MLP, the rest MoE
    num_experts_per_tok: int  # K
    n_shared_experts: int  # shared expert width = intermediate_size * n_shared_experts; 0 = no shared expert
    n_routed_experts: int  # E
    routed_scaling_factor: float = 1.0  # a class constant (1.0) in the reference; a real field here
    seq_aux: bool = True  # sequence-level aux loss (Cortex) instead of batch-level
    norm_topk_prob: bool = False  # renormalise the top-k weights to sum to 1

    def __post_init__(self):
        for name, least in (("intermediate_size", 1), ("num_experts_per_tok", 1), ("n_routed_experts", 1),
                            ("n_dense_layer", 0), ("n_shared_experts", 0)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < least:
                raise ValueError(f"MoEConfig.{name} must be an int >= {least}, got {getattr(self, name)!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"MoEConfig.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                             f"n_routed_experts={self.n_routed_experts}")


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None = num_attention_heads (multi-head attention)
    max_position_embeddings: int  # only feeds RoPE (YaRN factor); there is no length check
    original_max_position_embeddings: int | None = None  # YaRN: factor = max / original when set
    attention_dropout: float = 0.1  # the reference default, which Cortex 2.5 trained with
    attention_implementation: str = "sdpa"  # 'sdpa' or 'auto' (the reference's default); both mean SDPA
    rope_config: RoPEConfig = field(default_factory=RoPEConfig)
    moe_config: MoEConfig | None = None  # None = every layer dense
    use_qk_norm: bool = True

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.attention_implementation not in ("sdpa", "auto"):
            raise ValueError(f"attention_implementation={self.attention_implementation!r} is not supported; "
                             "this model always uses scaled_dot_product_attention ('sdpa' or 'auto')")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if self.moe_config is not None and self.moe_config.n_dense_layer > self.num_hidden_layers:
            raise ValueError(f"moe_config.n_dense_layer={self.moe_config.n_dense_layer} exceeds "
                             f"num_hidden_layers={self.num_hidden_layers}")

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (nested configs as dicts)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Inverse of to_dict; unknown keys are an error (they would otherwise be silently ignored)."""
        data = dict(data)
        for name, sub_cls in (("rope_config", RoPEConfig), ("moe_config", MoEConfig)):
            if isinstance(data.get(name), dict):
                data[name] = _dataclass_from_dict(sub_cls, data[name])
        return _dataclass_from_dict(cls, data)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe_config is not None and layer_idx >= self.moe_config.n_dense_layer


def _dataclass_from_dict(cls, data: dict):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    return cls(**data)


def cortex_2_5_config(long_context: bool = False) -> ModelConfig:
    """Cortex 2.5 (0.6B total, 0.2B active). Stage 0: 512 ctx, default RoPE; later stages: 2048 ctx, YaRN from 512."""
    return ModelConfig(
        vocab_size=46957, hidden_size=768, intermediate_size=2048, num_hidden_layers=24, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=2048 if long_context else 512,
        original_max_position_embeddings=512 if long_context else None,
        rope_config=RoPEConfig(rope_type="yarn" if long_context else "default", rope_theta=1e6),
        moe_config=MoEConfig(intermediate_size=1024, n_dense_layer=1, num_experts_per_tok=2, n_shared_experts=1,
                             n_routed_experts=8, seq_aux=True, norm_topk_prob=True),
    )


def tiny_config(vocab_size: int, long_context: bool = False) -> ModelConfig:
    """A tiny MoE config with the Cortex structure (dense layer 0, shared + routed experts) for tests and CPU runs."""
    cortex = cortex_2_5_config(long_context)
    return replace(cortex, vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256 if long_context else 128,
                   original_max_position_embeddings=128 if long_context else None, attention_dropout=0.0,
                   moe_config=replace(cortex.moe_config, intermediate_size=32, n_routed_experts=4))


@dataclass(frozen=True)
class ParameterCount:
    total: int  # every parameter, embeddings and lm_head included
    active: int  # used per token, excluding embed_tokens and lm_head (only K routed experts count)


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Parameter counts from the config alone (no model is built)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = 2 * hidden * hidden + 2 * hidden * config.num_key_value_heads * head_dim
    norms = 2 * hidden + (2 * head_dim if config.use_qk_norm else 0)
    dense_mlp = 3 * hidden * config.intermediate_size
    total = active = hidden  # head_norm
    for layer_idx in range(config.num_hidden_layers):
        if config.is_moe_layer(layer_idx):
            moe = config.moe_config
            expert = 3 * hidden * moe.intermediate_size
            always = attention + norms + expert * moe.n_shared_experts + moe.n_routed_experts * hidden  # + router
            total += always + moe.n_routed_experts * expert
            active += always + moe.num_experts_per_tok * expert
        else:
            total += attention + norms + dense_mlp
            active += attention + norms + dense_mlp
    total += 2 * config.vocab_size * hidden  # untied embed_tokens and lm_head
    return ParameterCount(total=total, active=active)
