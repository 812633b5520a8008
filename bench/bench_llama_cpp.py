"""llama.cpp runs our GGUF export: its greedy tokens against ours, on a tiny random Cortex-layout model (YaRN 2048
from 512, the tiny BPE tokenizer), exported to GGUF (default f16) and loaded through llama-cpp-python.

    pip3 install llama-cpp-python        # builds llama.cpp from source (10+ minutes on 2 cores)
    python3 bench/bench_llama_cpp.py [--gguf-type f16|bf16|q8_0|f32] [--new-tokens 32]

Ours runs in fp32 on the weights the GGUF holds, rounded the same way (f16/bf16/q8_0 round-trip through the gguf
package), so the two differ only by how they compute. Greedy is the argmax of each side's own logits (no sampler).
Also compares llama.cpp's tokenization of a chat prompt with ours, and with --cortex-tokens DIR (the Cortex 2.5
tokenizer files) its tokenization of the sample data's texts with the Cortex sentencepiece vocabulary. Prints one JSON
line; without llama-cpp-python it says so and exits 0.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import export  # noqa: E402
from exporters.parity_model import parity_model  # noqa: E402
from model import CortexModel, generate, save_weights, tiny_config  # noqa: E402
from serving.chat import build_prompt  # noqa: E402
from trainer.tokenizer import load_tokenizer, tiny_tokenizer  # noqa: E402

SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "sample_data" / "pretrain.jsonl"


def rounded_like_gguf(model: CortexModel, gguf_type: str) -> CortexModel:
    """A copy of model whose weights went through the GGUF types the export uses (the values llama.cpp reads).
    Rounding is per element (f16, bf16) or per 32-value block of a row (q8_0), and folding experts only joins whole
    rows or block-aligned row halves, so rounding before folding gives the file's values."""
    import gguf

    from exporters.gguf_file import encode

    rounded = CortexModel(model.config).eval()
    state = {}
    for key, tensor in model.state_dict().items():
        keep_f32 = tensor.dim() == 1 or key.endswith("mlp.gate.weight")  # norms and routers, as the export does
        data, qtype = encode(tensor, gguf_type, keep_f32)
        state[key] = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(tensor.shape).copy())
    rounded.load_state_dict(state)
    return rounded


def export_gguf(model: CortexModel, tokenizer_name: str, root: Path, gguf_type: str) -> Path:
    run = root / "run"
    run.mkdir(parents=True)
    save_weights(model, run / "model.safetensors")
    (run / "model_config.json").write_text(json.dumps(model.config.to_dict()))
    (run / "stage.json").write_text(json.dumps({"train_config": {"tokenizer": tokenizer_name}}))
    return export.export(run, "gguf", root / "cortex.gguf", gguf_type=gguf_type)


def cortex_tokenization(llama_cpp, token_dir: Path, root: Path) -> dict:
    """llama.cpp's ids for the sample texts (and a chat prompt) against ours, with the Cortex vocabulary in the file."""
    tokenizer = load_tokenizer(token_dir)
    path = export_gguf(CortexModel(tiny_config(tokenizer.vocab_size)), str(token_dir), root, "f16")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = [json.loads(line)["text"] for line in SAMPLE_TEXT.read_text(encoding="utf-8").splitlines()[:200]]
    texts += ["没见过的字：龘齉", "emoji 🦙"]  # characters outside the vocabulary (sentencepiece: byte pieces)
    differ = [t for t in texts if llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) != tokenizer.encode(t)]
    prompt, _ = build_prompt(tokenizer, [{"role": "user", "content": "1+1等于几？"}], True, 2048)
    return {"cortex_texts": len(texts), "cortex_texts_tokenized_differently": differ,
            "cortex_prompt_equal": llm.tokenize(tokenizer.decode(prompt).encode("utf-8"), add_bos=False,
                                                special=True) == prompt}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf-type", default="f16", choices=export.GGUF_TYPES)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cortex-tokens", type=Path, help="Cortex 2.5 tokenizer dir: also check its tokenization")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError as err:
        print(json.dumps({"skipped": True, "reason": f"llama-cpp-python is not installed ({err}); "
                          "pip3 install llama-cpp-python builds llama.cpp from source, then run this again"}))
        return

    tokenizer = tiny_tokenizer()
    model = parity_model(tokenizer.vocab_size, head_scale=20)  # decisive: greedy choices are not near-ties
    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(model, "tiny", Path(tmp) / "tiny", args.gguf_type)
        ours_model = rounded_like_gguf(model, args.gguf_type)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=args.threads, logits_all=True,
                              verbose=False)

        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12 + 7?"}]
        prompt, _ = build_prompt(tokenizer, messages, thinking=False, max_context=2048)
        prompt_text = tokenizer.decode(prompt)
        llama_prompt = llm.tokenize(prompt_text.encode("utf-8"), add_bos=False, special=True)

        llm.eval(prompt)
        theirs = []
        for _ in range(args.new_tokens):
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            theirs.append(token)
            llm.eval([token])
        ours = generate(ours_model, prompt, max_new_tokens=args.new_tokens)
        with torch.no_grad():
            ours_logits = ours_model(torch.tensor([prompt + ours[:-1]]))["logits"][0]
        llama_logits = torch.from_numpy(llm.scores[: len(prompt) + len(ours) - 1].copy())
        same_prefix = ours == theirs
        result = {
            "llama_cpp_python": llama_cpp.__version__, "gguf_type": args.gguf_type, "new_tokens": args.new_tokens,
            "greedy_tokens_equal": same_prefix,
            "first_difference": next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None),
            "max_abs_logit_diff": round(float((ours_logits - llama_logits).abs().max()) if same_prefix else float("nan"), 6),
            "logit_scale": round(float(ours_logits.abs().max()), 3),
            "prompt_tokens": len(prompt), "tokenization_equal": llama_prompt == prompt,
            "ours": ours, "llama_cpp": theirs,
        }
        if args.cortex_tokens:
            result |= cortex_tokenization(llama_cpp, args.cortex_tokens, Path(tmp) / "cortex")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
