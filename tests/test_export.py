"""export.py --format hf: a Cortex checkpoint as a Hugging Face Qwen3-MoE directory. transformers' logits equal
CortexModel's in fp32 past the YaRN original length, greedy generation matches, the chat template gives our prompt ids,
a published-format dpo.bin exports, and bad input is a clear error that leaves nothing behind."""

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import export
from exporters.parity_model import parity_model
from model import CortexModel, generate, save_weights, tiny_config
from serving.chat import build_prompt
from serving.checkpoint import CheckpointError
from trainer.tokenizer import load_tokenizer, tiny_tokenizer

SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "sample_data" / "pretrain.jsonl"


def train_briefly(model: CortexModel, tokenizer, steps: int = 12) -> CortexModel:
    """A few AdamW steps of next-token prediction on the sample pretraining text: weights as training leaves them."""
    texts = [json.loads(line)["text"] for line in SAMPLE_TEXT.read_text(encoding="utf-8").splitlines()[:64]]
    ids = torch.tensor([row[:65] for row in tokenizer.encode_batch(texts) if len(row) >= 65][:8])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        out = model(ids[:, :-1], targets=ids[:, 1:], sum_target_log_probs=True)
        (-out["target_log_probs"] / ids[:, 1:].numel() + 0.01 * out["aux_loss"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def write_run_dir(path: Path, model: CortexModel, tokenizer_name: str) -> Path:
    """A stage run dir as training leaves it (weights, model config, stage summary naming the tokenizer)."""
    path.mkdir(parents=True)
    save_weights(model, path / "model.safetensors")
    (path / "model_config.json").write_text(json.dumps(model.config.to_dict()))
    (path / "stage.json").write_text(json.dumps({"stage": "mix", "train_config": {"tokenizer": tokenizer_name}}))
    return path


def load_hf(out: Path, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, **kwargs)
    assert not any(info.values()), info  # every tensor used, none missing (none left at random init)
    return model.eval(), AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def random_export(tokenizer, tmp_path_factory):
    """(our model, HF model, HF tokenizer, export dir) of a random tiny long-context run dir."""
    root = tmp_path_factory.mktemp("random")
    model = parity_model(tokenizer.vocab_size)
    out = export.export(write_run_dir(root / "run", model, "tiny"), "hf", root / "hf")
    return (model, *load_hf(out), out)


@pytest.fixture(scope="module")
def trained_export(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    model = train_briefly(parity_model(tokenizer.vocab_size, seed=1), tokenizer)
    out = export.export(write_run_dir(root / "run", model, "tiny"), "hf", root / "hf")
    return (model, *load_hf(out), out)


def assert_same_function(ours: CortexModel, theirs, tokenizer, prompt: str):
    ids = torch.randint(0, tokenizer.vocab_size, (2, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 600 > 512: the YaRN-scaled frequencies matter
        expected, got = ours(ids)["logits"], theirs(ids).logits
    assert (expected - got).abs().max().item() < 1e-5
    assert torch.equal(expected.argmax(-1), got.argmax(-1))

    prompt_ids = tokenizer.encode(prompt)
    new = generate(ours, prompt_ids, max_new_tokens=32, stop_token_ids=(tokenizer.eos_id,))
    hf_new = theirs.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False)[0, len(prompt_ids):]
    assert hf_new.tolist() == new
    return new


def test_random_checkpoint_gives_the_same_logits_and_greedy_tokens(random_export, tokenizer):
    model, hf_model, _, out = random_export
    assert len(assert_same_function(model, hf_model, tokenizer, "The cat")) == 32  # no early stop: all 32 compared
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["mlp_only_layers"] == [0]
    assert config["rope_scaling"]["original_max_position_embeddings"] == 512 and config["rope_scaling"]["factor"] == 4.0
    assert config["moe_intermediate_size"] == 64 and config["intermediate_size"] == 128  # 32 own + 32 shared
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_id
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "README.md", "tokenizer.json", "config.json"}
    assert not list(out.parent.glob(".*partial*"))


def test_trained_checkpoint_gives_the_same_logits_and_greedy_tokens(trained_export, tokenizer):
    model, hf_model, _, _ = trained_export
    norms = model.layers[1].mlp_norm.weight
    assert not torch.allclose(norms, torch.ones_like(norms), atol=0.2)  # the training moved the weights
    assert_same_function(model, hf_model, tokenizer, "The cat")


CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi /no think"},
     {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "12 + 7?"}, {"role": "assistant", "think": "12 + 7 = 19", "content": "19"},
     {"role": "user", "content": "and 19 + 1? /think"}],
    [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "first /think"},
     {"role": "user", "content": "second"}, {"role": "assistant", "think": " ", "content": "ok"},
     {"role": "user", "content": "小明有5个苹果，吃了2个，还剩几个？"}],
]


def assert_template_gives_our_prompts(ours, hf_tokenizer):
    for messages in CONVERSATIONS:
        for thinking in (True, False):
            expected, dropped = build_prompt(ours, messages, thinking, max_context=4096)
            got = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking)
            assert got == expected and dropped == (messages[0]["role"] == "assistant")
    reasoning = [{**m, "reasoning_content": m.pop("think")} if "think" in m else m for m in map(dict, CONVERSATIONS[1])]
    assert hf_tokenizer.apply_chat_template(reasoning, add_generation_prompt=True) == \
        build_prompt(ours, CONVERSATIONS[1], True, max_context=4096)[0]


def test_chat_template_gives_our_prompt_ids(random_export, tokenizer):
    _, _, hf_tokenizer, _ = random_export
    assert_template_gives_our_prompts(tokenizer, hf_tokenizer)
    text = "Text, 数字 123 and </s> <think>"
    assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)


def test_cortex_tokenizer_export(cortex_tokens_dir, tmp_path):
    cortex = load_tokenizer(cortex_tokens_dir)
    torch.manual_seed(0)
    run = write_run_dir(tmp_path / "run", CortexModel(tiny_config(cortex.vocab_size)), str(cortex_tokens_dir))
    out = export.export(run, "hf", tmp_path / "hf")
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id, len(hf_tokenizer)) == (2, 46945, 46957)
    assert_template_gives_our_prompts(cortex, hf_tokenizer)
    for text in ("hello world", "def add(a, b):\n    return a + b", "  两个空格", "<user>x</s>"):
        assert hf_tokenizer.encode(text, add_special_tokens=False) == cortex.encode(text)


def test_published_format_bin_and_bfloat16(tokenizer, tmp_path):
    model = parity_model(tokenizer.vocab_size, seed=2)
    published = save_weights(model, tmp_path / "release" / "dpo.bin")  # the published layout: a plain torch state dict
    (published.parent / "model_config.json").write_text(json.dumps(model.config.to_dict()))
    out = export.export(published, "hf", tmp_path / "hf", tokenizer="tiny", dtype="bfloat16")
    with safetensors.safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
        assert torch.equal(weights.get_tensor("model.layers.1.self_attn.q_norm.weight"),
                           model.layers[1].attn.q_norm.weight.detach().bfloat16())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf_model, _ = load_hf(out, dtype="auto")  # transformers 4.x loads fp32 unless asked for the stored dtype
    assert hf_model.dtype == torch.bfloat16
    ids = torch.tensor([tokenizer.encode("The cat sat on the mat")])
    with torch.no_grad():
        assert (hf_model(ids).logits.float() - model(ids)["logits"]).abs().max() < 0.05


def test_bad_input_is_a_clear_error_and_leaves_nothing(tokenizer, tmp_path):
    model = parity_model(tokenizer.vocab_size)
    run = write_run_dir(tmp_path / "run", model, "tiny")

    lone = save_weights(model, tmp_path / "lone" / "dpo.bin")  # no model_config.json: read as the 0.6B model
    with pytest.raises(CheckpointError, match="model_config.json"):
        export.export(lone, "hf", tmp_path / "out", tokenizer="tiny")

    no_qk_norm = CortexModel(dataclasses.replace(tiny_config(tokenizer.vocab_size), use_qk_norm=False))
    with pytest.raises(ValueError, match="use_qk_norm=false"):
        export.export(write_run_dir(tmp_path / "other", no_qk_norm, "tiny"), "hf", tmp_path / "out")

    with pytest.raises(export.ExportError, match="tokenizer directory .*missing-tokens does not exist"):
        export.export(run, "hf", tmp_path / "out", tokenizer=str(tmp_path / "missing-tokens"))
    (tmp_path / "empty-tokens").mkdir()
    with pytest.raises(export.ExportError, match="neither tokenizer.json nor tokenizer.model"):
        export.export(run, "hf", tmp_path / "out", tokenizer=str(tmp_path / "empty-tokens"))

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(export.ExportError, match="cannot write the export to .*a-file/out"):
        export.export(run, "hf", tmp_path / "a-file" / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial*"))

    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="error: .*taken already exists; .*--overwrite"):
        export.main(["--checkpoint", str(run), "--format", "hf", "--out", str(tmp_path / "taken")])
