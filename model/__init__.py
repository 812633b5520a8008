"""The Cortex MoE network (no training, tokenizer or data code)."""

from .config import (ModelConfig, MoEConfig, ParameterCount, RoPEConfig, cortex_2_5_config, count_parameters,
                     tiny_config)
from .generate import batch_generate, generate, generate_stream, left_pad, process_logits, select_tokens
from .kv_cache import KVCache
from .transformer import CortexModel
from .weights import WeightsMismatchError, check_state_dict, load_state_dict_file, load_weights, save_weights

__all__ = [
    "ModelConfig", "MoEConfig", "RoPEConfig", "ParameterCount", "cortex_2_5_config", "tiny_config", "count_parameters",
    "KVCache", "CortexModel", "generate", "generate_stream", "batch_generate", "left_pad", "process_logits",
    "select_tokens", "load_weights", "save_weights", "load_state_dict_file", "check_state_dict", "WeightsMismatchError",
]
