"""A llama.cpp / Ollama GGUF file (architecture qwen3moe) with the tokenizer and the chat template inside.

Built from the same Qwen3-MoE tensors as the Hugging Face export (qwen3moe.hf_state_dict), renamed by the gguf package's
own name map. llama.cpp's qwen3moe wants experts in every layer, so a dense layer is written as identical experts with a
zero router: the softmax is uniform and any renormalised top-k mix of identical experts is the dense MLP. Experts and
dense MLPs of different widths are zero-padded to one width (zero rows/columns add exactly nothing).
"""

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from exporters import qwen3moe
from exporters.chat_template import CHAT_TEMPLATE
from model import CortexModel
from trainer.tokenizer import SPECIAL_TOKENS, Tokenizer

ARCH = gguf.MODEL_ARCH.QWEN3MOE
TENSOR_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def write_gguf(model: CortexModel, tokenizer: Tokenizer, path: Path, gguf_type: str, name: str) -> None:
    config = model.config
    hf = qwen3moe.hf_config(config, rms_norm_eps=model.head_norm.eps)
    if not (hf["norm_topk_prob"] and hf["num_experts_per_tok"] > 1):
        raise qwen3moe.UnsupportedModelError("llama.cpp's qwen3moe always renormalises the top-k expert weights: this "
                                             "checkpoint (norm_topk_prob=false) cannot be written as GGUF")
    width = max(hf["moe_intermediate_size"], hf["intermediate_size"])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCH])
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(width)
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_key_length(hf["head_dim"])
    writer.add_value_length(hf["head_dim"])
    writer.add_rope_dimension_count(hf["head_dim"])
    writer.add_rope_freq_base(hf["rope_theta"])
    scaling = hf["rope_scaling"]
    if scaling is not None:  # llama.cpp's yarn is Cortex's static YaRN, attention factor 0.1*ln(factor)+1 included
        extra = {k: v for k, v in scaling.items() if k not in ("rope_type", "factor", "original_max_position_embeddings")}
        if extra != {"beta_fast": 32.0, "beta_slow": 1.0}:
            raise qwen3moe.UnsupportedModelError(f"YaRN settings {extra} are not written to GGUF (only the defaults "
                                                 f"beta_fast=32, beta_slow=1 without mscale or attention_factor)")
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_expert_count(hf["num_experts"])
    writer.add_expert_used_count(hf["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(width)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(ARCH, hf["num_hidden_layers"])
    for hf_name, tensor in gguf_tensors(model, hf, width).items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        data, qtype = encode(tensor, gguf_type, keep_f32=tensor.dim() == 1 or ".ffn_gate_inp." in gguf_name)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_tensors(model: CortexModel, hf: dict, width: int) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors with every layer's experts stacked ((E, W, H) gate/up, (E, H, W) down) and a router."""
    tensors = qwen3moe.hf_state_dict(model)
    num_experts, hidden = hf["num_experts"], hf["hidden_size"]
    for layer in range(hf["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp."
        for proj, dim in qwen3moe.EXPERT_CONCAT_DIM.items():
            if layer in hf["mlp_only_layers"]:
                experts = [tensors.pop(f"{prefix}{proj}.weight")] * num_experts
            else:
                experts = [tensors.pop(f"{prefix}experts.{e}.{proj}.weight") for e in range(num_experts)]
            stacked = torch.stack(experts)
            pad = width - stacked.shape[1 + dim]
            stacked = torch.nn.functional.pad(stacked, (0, 0, 0, pad) if dim == 0 else (0, pad))
            tensors[f"{prefix}experts.{proj}.weight"] = stacked
        if layer in hf["mlp_only_layers"]:
            tensors[f"{prefix}gate.weight"] = torch.zeros(num_experts, hidden)
    return tensors


def encode(tensor: torch.Tensor, gguf_type: str, keep_f32: bool) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(data, type) for add_tensor. keep_f32 for norms and routers (small, precision-critical); q8_0 needs rows that
    are a multiple of its block, else f16."""
    data = tensor.detach().float().numpy()
    qtype = TENSOR_TYPES[gguf_type]
    if keep_f32:
        qtype = gguf.GGMLQuantizationType.F32
    elif data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The vocabulary as llama.cpp reads it: Cortex's sentencepiece unigram model or our byte-level BPE ('gpt2'),
    padded to the model's vocabulary size with unused tokens."""
    if tokenizer.kind == "cortex":
        tokens, scores, types = sentencepiece_vocab(tokenizer.token_dir)
        # 't5' is llama.cpp's unigram (Viterbi) tokenizer: it splits text as sentencepiece does. Its 'llama' tokenizer
        # merges pieces greedily by score, which split 126 of 204 sample texts differently (bench/bench_llama_cpp.py)
        writer.add_tokenizer_model("t5")
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(False)  # the Cortex model's normaliser adds no dummy prefix and keeps whitespace
        writer.add_remove_extra_whitespaces(False)
    else:
        tokens, scores, types = bpe_vocab(tokenizer)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # ByteLevel with the GPT-2 split regex
        merges = json.loads(tokenizer.hf.backend_tokenizer.to_str())["model"]["merges"]
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} ids but the model only {vocab_size}")
    while len(tokens) < vocab_size:
        _append_unused(tokens, scores, types)
    writer.add_token_list(tokens)
    if tokenizer.kind == "cortex":  # a unigram model's piece scores; BPE goes by its merges
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    if tokenizer.hf.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.hf.bos_token_id)
    writer.add_add_bos_token(False)  # Cortex prompts start with <system>, never <s>
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.eos_id)  # </s> ends every turn
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_unk_token_id(tokenizer.unk_id)


def sentencepiece_vocab(token_dir: Path) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types of tokenizer.model with the special tokens of tokenizer_config.json over them (ids 1
    and 2 are <s> and </s> there, the added tokens follow the pieces); ids in between are unused."""
    from sentencepiece import sentencepiece_model_pb2  # only the Cortex tokenizer needs it

    spm = sentencepiece_model_pb2.ModelProto()
    spm.ParseFromString((token_dir / "tokenizer.model").read_bytes())
    # sentencepiece's piece types (normal, unknown, control, user-defined, unused, byte) are GGUF's, numbered alike
    tokens = [piece.piece for piece in spm.pieces]
    scores = [piece.score for piece in spm.pieces]
    types = [gguf.TokenType(piece.type) for piece in spm.pieces]
    config = json.loads((token_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    for token_id, added in sorted((int(k), v) for k, v in config["added_tokens_decoder"].items()):
        while len(tokens) <= token_id:
            _append_unused(tokens, scores, types)
        tokens[token_id], scores[token_id] = added["content"], 0.0
        types[token_id] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    return tokens, scores, types


def bpe_vocab(tokenizer: Tokenizer) -> tuple[list[str], list[float], list[int]]:
    """Our byte-level BPE: tokens by id, the special ones as control tokens."""
    by_id = {token_id: token for token, token_id in tokenizer.hf.get_vocab().items()}
    special = set(tokenizer.hf.all_special_ids) | set(tokenizer.hf.convert_tokens_to_ids(SPECIAL_TOKENS))
    tokens, scores, types = [], [], []
    for token_id in range(max(by_id) + 1):
        if token_id not in by_id:
            _append_unused(tokens, scores, types)
            continue
        tokens.append(by_id[token_id])
        scores.append(0.0)
        types.append(gguf.TokenType.CONTROL if token_id in special else gguf.TokenType.NORMAL)
    return tokens, scores, types


def _append_unused(tokens: list[str], scores: list[float], types: list[int]) -> None:
    tokens.append(f"[PAD{len(tokens)}]")
    scores.append(-1000.0)
    types.append(gguf.TokenType.UNUSED)
