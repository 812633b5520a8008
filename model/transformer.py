"""CortexModel: the decoder-only MoE transformer, state-dict compatible with the reference `llm_model` 0.6.0 LlmModel."""

import torch
from torch import nn

from .attention import Attention, build_attention_bias
from .config import ModelConfig
from .head import LMHead, compute_dtype
from .kv_cache import KVCache
from .mlp import MLP
from .moe import MoE, RoutedExperts
from .norm import RMSNorm
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(attn_norm(x)); out = h + ffn(mlp_norm(h)), ffn dense or MoE."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, attn_bias, is_causal, cache, gather_experts: bool = False):
        h = self.attn(self.attn_norm(x), cos, sin, attn_bias, is_causal, cache) + x
        if self.is_moe:
            ffn_out, aux_loss = self.mlp(self.mlp_norm(h), gather_experts)
        else:
            ffn_out, aux_loss = self.mlp(self.mlp_norm(h)), None
        return ffn_out + h, aux_loss


class CortexModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.rotary_emb = RotaryEmbedding(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, idx) for idx in range(config.num_hidden_layers))
        self.head_norm = RMSNorm(config.hidden_size)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # N(0, 0.02) for Linear, Embedding and routed experts; norms stay 1, the router keeps its kaiming init
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RoutedExperts):
            module.init_weights(lambda weight: nn.init.normal_(weight, mean=0.0, std=0.02))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, doc_boundary_mask: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False, logits_to_keep: int = 0,
                targets: torch.Tensor | None = None, sum_target_log_probs: bool = False,
                return_entropy: bool = False, temperature: float = 1.0) -> dict:
        """input_ids (B, T) new tokens; attention_mask (B, P+T) True = real token, covering the cached positions too.
        position_ids (B or 1, T), default arange(P, P+T); doc_boundary_mask (B, 1, T, P+T) for packed documents, bool
            (True = may attend) or the reference's additive float form; causality is always added on top.
        past_key_values: a KVCache, used and updated whenever given; use_cache=True creates one.
        logits_to_keep: 0 = logits for all T positions, k > 0 = only the last k.
        targets (B, T or k): score these token ids (-100 = not scored) instead of returning logits, a chunk of positions
            at a time (model/head.py); for next-token prediction pass the inputs shifted left.
        sum_target_log_probs: return their sum (0-d, the cross-entropy case); return_entropy: each position's entropy.
        temperature: logits / temperature, so scores and entropies are those of softmax(logits / temperature).
        Returns {'logits': (B, T or k, V) or None with targets, 'aux_loss': the MoE layers' summed aux loss (0-d fp32)
        when training, else None, 'past_key_values'}, with targets also 'target_log_probs' ((B, T or k) fp32, 0 where
        not scored, or their sum) and 'entropy' ((B, T or k) fp32, or None).
        """
        batch, new_len = input_ids.shape
        if targets is None and (sum_target_log_probs or return_entropy):
            raise ValueError("sum_target_log_probs and return_entropy apply to scored targets: pass targets=... too")
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        past_len = past_key_values.get_seq_len() if past_key_values is not None else 0

        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + new_len, device=x.device).unsqueeze(0)
        elif position_ids.dim() != 2 or position_ids.shape[1] != new_len or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected ({batch} or 1, {new_len})")
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        attn_bias, is_causal = build_attention_bias(attention_mask, doc_boundary_mask, batch, new_len, past_len,
                                                    compute_dtype(x), x.device)

        aux_loss = None
        for layer in self.layers:
            x, layer_aux = layer(x, cos, sin, attn_bias, is_causal, past_key_values)
            if layer_aux is not None:
                aux_loss = layer_aux if aux_loss is None else aux_loss + layer_aux

        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        x = self.head_norm(x)
        if temperature != 1.0:  # logits / T = (x / T) @ W.T (the head has no bias): the chunked scoring still applies
            x = x / temperature
        out = {"aux_loss": aux_loss, "past_key_values": past_key_values}
        if targets is None:
            return out | {"logits": self.lm_head(x)}
        log_probs, entropy = self.lm_head(x, targets, return_entropy, sum_target_log_probs)
        return out | {"logits": None, "target_log_probs": log_probs, "entropy": entropy}
