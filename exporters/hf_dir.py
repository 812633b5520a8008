"""A Hugging Face model directory (Qwen3MoeForCausalLM, no remote code): safetensors weights, config.json,
generation_config.json, the tokenizer with the Cortex chat template, and a model card."""

import json
from pathlib import Path

import safetensors.torch
import torch
from transformers import GenerationConfig, Qwen3MoeConfig

from exporters import qwen3moe
from exporters.chat_template import CHAT_TEMPLATE
from model import CortexModel, count_parameters
from trainer.tokenizer import Tokenizer

WEIGHTS_FILE, CHAT_TEMPLATE_FILE = "model.safetensors", "chat_template.jinja"


def write_hf_dir(model: CortexModel, tokenizer: Tokenizer, out_dir: Path, dtype: torch.dtype, source: str) -> None:
    """Write the export into out_dir (an existing, empty directory). source: what it was exported from (model card)."""
    config = model.config
    hf_kwargs = qwen3moe.hf_config(config, rms_norm_eps=model.head_norm.eps)
    tensors = {name: tensor.to(dtype).contiguous() for name, tensor in qwen3moe.hf_state_dict(model).items()}
    safetensors.torch.save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    stored = sum(tensor.numel() for tensor in tensors.values())
    del tensors

    ids = dict(bos_token_id=tokenizer.hf.bos_token_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    Qwen3MoeConfig(**hf_kwargs, **ids, torch_dtype=str(dtype).removeprefix("torch.")).save_pretrained(out_dir)
    GenerationConfig(**ids).save_pretrained(out_dir)  # </s> ends a turn; greedy unless the caller samples

    # The Cortex sentencepiece files as released: a tokenizer.json re-saved by transformers 4.57 reloads with </s>
    # moved to id 46944, the original files convert to the right ids. transformers reads chat_template.jinja beside them.
    tokenizer.save(out_dir)
    (out_dir / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE, encoding="utf-8")

    (out_dir / "README.md").write_text(model_card(model, hf_kwargs, stored, dtype, source), encoding="utf-8")


def model_card(model: CortexModel, hf_kwargs: dict, stored: int, dtype: torch.dtype, source: str) -> str:
    counts = count_parameters(model.config)
    width = hf_kwargs["moe_intermediate_size"]
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---
# Cortex (Qwen3-MoE export)

A Cortex mixture-of-experts language model exported from `{Path(source).name}` as `{qwen3moe.ARCHITECTURE}`, so it loads
with plain transformers (no `trust_remote_code`):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("DIR")
model = AutoModelForCausalLM.from_pretrained("DIR")
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "What is 12 + 7?"}}], add_generation_prompt=True,
                                    enable_thinking=False, return_tensors="pt")
print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:]))
```

- {hf_kwargs["num_hidden_layers"]} layers, hidden size {hf_kwargs["hidden_size"]}, {hf_kwargs["num_attention_heads"]} query /
  {hf_kwargs["num_key_value_heads"]} key-value heads, {hf_kwargs["num_experts"]} experts with {hf_kwargs["num_experts_per_tok"]}
  per token, layers {hf_kwargs["mlp_only_layers"]} dense, vocabulary {hf_kwargs["vocab_size"]}, context
  {hf_kwargs["max_position_embeddings"]} (RoPE scaling: {json.dumps(hf_kwargs["rope_scaling"])}). Weights in {str(dtype).removeprefix("torch.")}.
- Cortex has an always-on shared expert; here it is folded into every routed expert (expert width {width}), which
  computes the same function because the top-{hf_kwargs["num_experts_per_tok"]} weights are renormalised to sum to 1. Stored parameters:
  {stored:,} (Cortex: {counts.total:,}).
- Chat format: `<system>S</s><user>Q /think</s><assistant><think>T</think><answer>A</answer></s>`; the chat template
  writes it, `enable_thinking=False` asks for an answer without thinking. `</s>` ends a turn.
- Differences from Cortex itself: transformers (and vLLM) compute the router in the model dtype, Cortex in fp32, so in
  bf16/fp16 near-ties can pick other experts. In fp32 the logits agree to about 1e-6.
"""
