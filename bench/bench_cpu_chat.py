"""The full Cortex 2.5 model served on a CPU in fp32, bf16 and int8 weights (serving/checkpoint.py, model/quantize.py).

    OMP_NUM_THREADS=2 python bench/bench_cpu_chat.py            # prints one JSON object
    python bench/bench_cpu_chat.py --gguf-f16 cortex-f16.gguf --gguf-q8 cortex-q8_0.gguf   # with llama.cpp

Random weights, seeded (no hub access needed), with the head scaled up so next-token distributions are about as peaked
as a trained model's (see bench_app.py); written once as a .safetensors file. Each format runs in its own process (so
start-up and resident memory are its own): load_for_serving (read + quantize + cast) = start-up, then through the
server's Engine: time to first token of a 512-token prompt, greedy decode of 256 tokens at batch 1 (decode tokens/s =
tokens after the first / their time), 8 concurrent requests of 64 tokens (aggregate tokens/s), and the logits of a
held-out sample_data text (teacher forced, 512 tokens). Peak RSS is read at the end. Quality against fp32: greedy
agreement = share of the 256 greedy positions where the tokens equal fp32's (and the first differing one), held-out
argmax agreement and the max |logit - fp32 logit|. Formats run fp32, bf16, int8, then in reverse with --rounds 2
(medians). llama.cpp runs through llama-cpp-python when it is importable and a GGUF is given.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model import CortexModel, cortex_2_5_config, save_weights  # noqa: E402
from serving.checkpoint import cpu_features, load_for_serving  # noqa: E402
from serving.engine import Engine, Finished, GenerationRequest, SamplingParams  # noqa: E402

FORMATS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("float32", "int8")}
LM_HEAD_STD = 0.15  # x std sqrt(hidden): logits of std ~4, peaked like a trained model's
PROMPT_TOKENS, GREEDY_TOKENS, SLOTS, SLOT_TOKENS, HELDOUT_TOKENS = 512, 256, 8, 64, 512
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=GREEDY_TOKENS)


def held_out_ids(tokenizer, count: int) -> list[int]:
    texts = [json.loads(line)["text"] for line in (REPO_ROOT / "sample_data/pretrain.jsonl").open(encoding="utf-8")
             if json.loads(line)["split"] == "eval"]
    ids = tokenizer.encode("\n".join(texts))
    if len(ids) < count:
        raise SystemExit(f"sample_data eval text has {len(ids)} tokens, fewer than {count}")
    return ids[:count]


def run_request(engine: Engine, prompt: list[int], sampling: SamplingParams) -> tuple[list[int], list[float]]:
    """(tokens, their arrival times) of one request run to the end."""
    request = engine.submit(GenerationRequest(prompt, sampling, thinking=False))
    tokens, times = [], []
    while not isinstance(event := request.events.get(), Finished):
        tokens.append(event.token_id)
        times.append(time.perf_counter())
    if event.reason not in ("stop", "length"):
        raise RuntimeError(f"generation ended with {event.reason}")
    return tokens, times


def measure_format(name: str, weights: Path, out: Path) -> dict:
    """In a fresh process: one format's figures; logits and greedy tokens saved to out for the comparison."""
    dtype, quantize = FORMATS[name]
    start = time.perf_counter()
    served = load_for_serving(weights, "cortex", "cpu", dtype, quantize)
    startup_s = time.perf_counter() - start
    engine = Engine(served.model, served.tokenizer, slots=SLOTS, max_queue=SLOTS, seed=0).start()
    try:
        ids = held_out_ids(served.tokenizer, HELDOUT_TOKENS)
        prompt = ids[:PROMPT_TOKENS]
        sent = time.perf_counter()
        _, times = run_request(engine, prompt, SamplingParams(temperature=0.0, max_new_tokens=1))
        ttft_s = times[0] - sent
        greedy, times = run_request(engine, prompt[:16], GREEDY)
        decode_tps = (len(times) - 1) / (times[-1] - times[0])
        sent = time.perf_counter()
        requests = [engine.submit(GenerationRequest(prompt[i:i + 16], SamplingParams(0.0, max_new_tokens=SLOT_TOKENS),
                                                    thinking=False)) for i in range(SLOTS)]
        generated = 0
        for request in requests:
            while not isinstance(event := request.events.get(), Finished):
                generated += 1
        slots_tps = generated / (time.perf_counter() - sent)
    finally:
        engine.stop()
    with torch.no_grad():
        logits = served.model(torch.tensor([ids]))["logits"][0].float()
    torch.save({"greedy": greedy, "logits": logits}, out)
    return {"format": name, "dtype": dtype, "quantize": quantize, "startup_s": round(startup_s, 2),
            "ttft_512_s": round(ttft_s, 3), "decode_tok_s_batch1": round(decode_tps, 2),
            f"decode_tok_s_{SLOTS}_slots": round(slots_tps, 2), "greedy_tokens": len(greedy),
            "rss_mb": resident_mb(), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def resident_mb() -> int:
    """The process's resident memory now (VmRSS), after serving; the peak includes loading."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024)
    raise RuntimeError("no VmRSS in /proc/self/status")


def quality(reference: dict, other: dict) -> dict:
    ref, got = reference["greedy"], other["greedy"]
    same = [a == b for a, b in zip(ref, got)]
    first_diff = same.index(False) if False in same else len(same)
    return {"greedy_agreement": round(sum(same) / max(len(ref), 1), 3), "greedy_first_difference": first_diff,
            "heldout_argmax_agreement": round((reference["logits"].argmax(-1) == other["logits"].argmax(-1))
                                              .float().mean().item(), 3),
            "max_logit_error": round((reference["logits"] - other["logits"]).abs().max().item(), 3),
            "logit_range": round(reference["logits"].abs().max().item(), 2)}


def llama_cpp(path: str | None, precision: str, prompt: list[int]) -> dict:
    if path is None:
        return {"missing": f"no --gguf-{precision} given: export the weights to GGUF at {precision} and pass it"}
    try:
        import llama_cpp
    except ImportError as err:
        return {"missing": f"llama-cpp-python is not importable ({err}); pip install llama-cpp-python"}
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    startup_s = time.perf_counter() - start
    sent = time.perf_counter()
    llm.eval(prompt[:PROMPT_TOKENS])
    ttft_s = time.perf_counter() - sent
    llm.reset()
    llm.eval(prompt[:16])
    start = time.perf_counter()
    for _ in range(GREEDY_TOKENS - 1):
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
    return {"gguf": path, "startup_s": round(startup_s, 2), "ttft_512_s": round(ttft_s, 3),
            "decode_tok_s_batch1": round((GREEDY_TOKENS - 1) / (time.perf_counter() - start), 2)}


def write_random_weights(path: Path):
    torch.manual_seed(0)
    model = CortexModel(cortex_2_5_config(long_context=True))
    torch.nn.init.normal_(model.lm_head.weight, std=LM_HEAD_STD)
    save_weights(model, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, fp32 first (the reference)")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the formats, alternating their order")
    parser.add_argument("--gguf-f16", help="GGUF export at f16, compared with bf16")
    parser.add_argument("--gguf-q8", help="GGUF export at q8_0, compared with int8")
    parser.add_argument("--one", nargs=3, metavar=("FORMAT", "WEIGHTS", "OUT"), help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_format(args.one[0], Path(args.one[1]), Path(args.one[2]))))
        return
    formats = args.formats.split(",")
    if formats[0] != "fp32" or not set(formats) <= set(FORMATS):
        parser.error(f"--formats must start with fp32 and name only {', '.join(FORMATS)}")
    capability, native_bf16 = cpu_features()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "cortex.safetensors"
        write_random_weights(weights)
        runs = {name: [] for name in formats}
        for round_idx in range(args.rounds):
            for name in (formats if round_idx % 2 == 0 else formats[::-1]):
                child = subprocess.run([sys.executable, __file__, "--one", name, str(weights), f"{tmp}/{name}.pt"],
                                       check=True, capture_output=True, text=True, env=os.environ | {
                                           "PYTHONPATH": str(REPO_ROOT)})
                runs[name].append(json.loads(child.stdout.strip().splitlines()[-1]))
        saved = {name: torch.load(f"{tmp}/{name}.pt") for name in formats}
        from trainer.tokenizer import get_tokenizer
        prompt = held_out_ids(get_tokenizer("cortex"), PROMPT_TOKENS)
    results = {}
    for name, figures in runs.items():
        merged = {key: statistics.median(run[key] for run in figures) if isinstance(value, float) else value
                  for key, value in figures[0].items()}
        results[name] = merged | ({} if name == "fp32" else quality(saved["fp32"], saved[name]))
    print(json.dumps({
        "model": "Cortex 2.5 full config (cortex_2_5_config(long_context=True)), random weights, seed 0",
        "threads": torch.get_num_threads(), "rounds": args.rounds, "load_average": os.getloadavg(),
        "cpu_capability": capability, "mkldnn_bf16_supported": native_bf16,
        "kernels": {"fp32": "F.linear fp32 (MKL/oneDNN sgemm)", "bf16": "F.linear bf16 (oneDNN, native only where "
                    "mkldnn_bf16_supported)", "int8": "torch._weight_int8pack_mm with bf16 activations, fp32 elsewhere"},
        "formats": results,
        "llama_cpp": {"f16_vs_bf16": llama_cpp(args.gguf_f16, "f16", prompt),
                      "q8_0_vs_int8": llama_cpp(args.gguf_q8, "q8", prompt)},
    }, indent=1))


if __name__ == "__main__":
    main()
