"""export.py --format gguf: the file read back with the gguf package (architecture, metadata, tensor names, shapes and
types, the folded experts, the tokenizer ids and chat template). llama.cpp's own tokens: bench/bench_llama_cpp.py."""

import dataclasses

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import export
from model import CortexModel
from exporters.chat_template import CHAT_TEMPLATE
from exporters.gguf_file import sentencepiece_vocab
from exporters.parity_model import parity_model
from exporters.qwen3moe import hf_state_dict
from trainer.tokenizer import load_tokenizer, tiny_tokenizer
from test_export import write_run_dir


def read(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def as_matrix(tensor) -> np.ndarray:
    """A tensor's values as float32 in numpy shape (the reverse of GGUF's dimension order)."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return data.reshape([int(n) for n in reversed(tensor.shape)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = tiny_tokenizer()
    model = parity_model(tokenizer.vocab_size)
    run = write_run_dir(root / "run", model, "tiny")
    files = {kind: export.export(run, "gguf", root / f"cortex-{kind}.gguf", gguf_type=kind) for kind in ("f16", "q8_0")}
    return model, tokenizer, files


def test_metadata_tensors_and_tokenizer(exported):
    model, tokenizer, files = exported
    fields, tensors = read(files["f16"])
    assert fields["general.architecture"] == "qwen3moe"
    expected_fields = {"block_count": 3, "context_length": 2048, "embedding_length": 64, "attention.head_count": 4,
                       "attention.head_count_kv": 2, "attention.key_length": 16, "rope.dimension_count": 16,
                       "rope.freq_base": 1e6, "rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                       "rope.scaling.original_context_length": 512, "expert_count": 4, "expert_used_count": 2,
                       "expert_feed_forward_length": 128}  # dense 128 wide; folded experts 64, zero-padded
    assert {k: fields[f"qwen3moe.{k}"] for k in expected_fields} == expected_fields
    assert fields["qwen3moe.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)

    per_block = {"attn_norm": (64,), "attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64),
                 "attn_output": (64, 64), "attn_q_norm": (16,), "attn_k_norm": (16,), "ffn_norm": (64,),
                 "ffn_gate_inp": (4, 64), "ffn_gate_exps": (4, 128, 64), "ffn_up_exps": (4, 128, 64),
                 "ffn_down_exps": (4, 64, 128)}
    expected = {"token_embd.weight": (2048, 64), "output_norm.weight": (64,), "output.weight": (2048, 64)}
    expected |= {f"blk.{i}.{name}.weight": shape for i in range(3) for name, shape in per_block.items()}
    assert {name: tuple(reversed([int(n) for n in t.shape])) for name, t in tensors.items()} == expected
    for name, tensor in tensors.items():  # norms and routers in f32, the matrices in the requested type
        small = tensor.data.ndim == 1 or "ffn_gate_inp" in name
        assert tensor.tensor_type.name == ("F32" if small else "F16"), name

    # layer 0 (dense): identical experts, zero router; layer 1: expert e is [own; shared], zero-padded to 128
    dense = as_matrix(tensors["blk.0.ffn_gate_exps.weight"])
    assert (dense == dense[:1]).all() and not as_matrix(tensors["blk.0.ffn_gate_inp.weight"]).any()
    assert np.array_equal(dense[0], model.layers[0].mlp.gate_proj.weight.detach().half().float().numpy())
    folded = hf_state_dict(model)
    down = as_matrix(tensors["blk.1.ffn_down_exps.weight"])
    assert np.array_equal(down[2, :, :64], folded["model.layers.1.mlp.experts.2.down_proj.weight"].half().float().numpy())
    assert not down[:, :, 64:].any()

    vocab = tokenizer.hf.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.tokens"] == vocab
    assert (fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.eot_token_id"]) == (tokenizer.eos_id,) * 2
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_id
    assert fields["tokenizer.ggml.token_type"][tokenizer.think_id] == gguf.TokenType.CONTROL
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE

    fields, tensors = read(files["q8_0"])
    assert tensors["blk.1.ffn_up_exps.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"


def test_cortex_sentencepiece_vocabulary(cortex_tokens_dir):
    # the list the writer stores (reading a 47k-token file back with GGUFReader takes ~40 s; the round trip of the
    # vocabulary is checked on the tiny tokenizer above)
    cortex = load_tokenizer(cortex_tokens_dir)
    tokens, _, types = sentencepiece_vocab(cortex.token_dir)
    assert len(tokens) == 46957 and tokens[2] == "</s>" and cortex.eos_id == 2
    for text in ("<user>", "<assistant>", "<think>", "</think>", "<answer>", "</answer>", "<system>", "<pad>"):
        token_id = cortex.hf.convert_tokens_to_ids(text)
        assert tokens[token_id] == text and types[token_id] == gguf.TokenType.CONTROL
    for token_id in cortex.encode("hello world 你好"):  # ordinary pieces keep their sentencepiece text
        assert tokens[token_id] == cortex.hf.convert_ids_to_tokens(token_id)
    assert types[46943] == types[46944] == gguf.TokenType.UNUSED


def test_gguf_needs_renormalised_top_k(tmp_path):
    tokenizer = tiny_tokenizer()
    model = parity_model(tokenizer.vocab_size)
    config = dataclasses.replace(model.config, moe_config=dataclasses.replace(model.config.moe_config,
                                                                             n_shared_experts=0, norm_topk_prob=False))
    run = write_run_dir(tmp_path / "run", CortexModel(config), "tiny")
    with pytest.raises(ValueError, match="norm_topk_prob=false"):
        export.export(run, "gguf", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial*"))
