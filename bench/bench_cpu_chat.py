"""The full Cortex 2.5 model served on a CPU in fp32, bf16 weights (fp32 compute), bf16 and int8 weights
(serving/checkpoint.py, quantize.py), and llama.cpp on the GGUF export of the same weights (f16 against bf16, q8_0
against int8).

    OMP_NUM_THREADS=2 TOKEN_DIR=DIR python bench/bench_cpu_chat.py --rounds 2     # prints one JSON object

Random weights, seeded (no hub access needed), with the head scaled up so next-token distributions are about as peaked
as a trained model's (see bench_app.py); written once as a torch .bin of fp32 weights, the published dpo.bin's format
(zero_to_fp32's output). Each format runs in its own process (so start-up and resident memory are its own):
load_for_serving (read + quantize + cast) = start-up, then through the server's Engine: time to first token of a
512-token prompt, and of a chat's next turn (that prompt, its 64-token greedy reply and 64 new tokens: 640 in all) with
prefix reuse (the server's default: 65 of them prefilled) and without; greedy decode of 256 tokens at batch 1 (decode
tokens/s = tokens after the first / their time), 8 concurrent requests of 64 tokens (aggregate tokens/s), and the logits
of a held-out sample_data text (teacher forced, 512 tokens in one prefill, and the first 128 of them again one token a
step, as decoding computes them). Peak RSS is read at the end (it counts the mapped file's pages), the peak of anonymous
memory while loading (RssAnon) sampled. Quality against fp32: greedy agreement = share of the 256 greedy positions where
the tokens equal fp32's (and the first differing one), held-out argmax agreement and the max |logit - fp32 logit|, of
the prefill and of the steps (heldout_decode_*). With llama-cpp-python importable, the weights are exported by export.py
to GGUF f16 and q8_0 and llama.cpp is timed the same way (its own process, OMP_NUM_THREADS threads for prompt and
decode, the prompt in one 512-token batch, then one token per eval call; no batched API, so no 8-slot figure; its next
turn evaluates the new tokens after the reply in the same context, as llama.cpp's server reuses a slot's cache; its
held-out logits come from a second load that keeps every position's). Formats run in the order given, then in reverse
with --rounds 2 (medians). Where bf16 matmuls are native, the stored formats multiply a prompt's rows in bf16
(serving/checkpoint.py prefill_dtype); the *-fp32-prefill formats (not run by default) are those formats with prompts in
fp32, as on other CPUs. The *-compiled formats (not run by default) serve with the Engine's compile=True (app.py
--compile): start-up includes compile_s, the warm-up compile of every decode graph (with inductor's cache on disk warm
from an earlier run, it is shorter).

    OMP_NUM_THREADS=2 python bench/bench_cpu_chat.py --decode-steps --rounds 3

only times bare batch-1 decode steps in one process (fp32 and bf16 eager, bf16 weights and int8 eager and compiled,
and where serving/cpu_gemv.c is built those again on torch's kernels alone; alternating), and each eager format's
matrix products of one step alone (every linear layer, the shared and two routed experts of each MoE layer, the head;
the model's own weights, so read from memory as in a step): the floor its kernels set.
"""

import argparse
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model import CortexModel, KVCache, cortex_2_5_config, save_weights  # noqa: E402
from model.compiled_decode import CompiledDecoder  # noqa: E402
from model.moe import RoutedExperts  # noqa: E402
from serving.checkpoint import cpu_features, load_for_serving, prefill_dtype  # noqa: E402
from serving.engine import Engine, Finished, GenerationRequest, SamplingParams  # noqa: E402
from serving import cpu_gemv  # noqa: E402
from serving.quantize import (StoredLinear, StoredMLP, StoredRoutedExperts, kernels, store_weights,  # noqa: E402
                              stored_expert)

FORMATS = {"fp32": ("float32", "none"), "bf16-weights": ("float32", "bf16"), "bf16": ("bfloat16", "none"),
           "bf16-weights-bf16-compute": ("bfloat16", "bf16"), "int8-bf16-compute": ("bfloat16", "int8"),
           "int8": ("float32", "int8"), "fp32-compiled": ("float32", "none"),  # name: dtype, quantize
           "bf16-weights-compiled": ("float32", "bf16"), "int8-compiled": ("float32", "int8"),  # (+ Engine --compile)
           "bf16-weights-fp32-prefill": ("float32", "bf16"), "int8-fp32-prefill": ("float32", "int8")}  # (+ below)
DEFAULT_FORMATS = ["fp32", "bf16-weights", "bf16", "int8"]  # compiled ones add minutes of compiling: asked by name
LLAMA_CPP = {"llama.cpp-f16": "f16", "llama.cpp-q8_0": "q8_0"}  # GGUF type of each llama.cpp row
LM_HEAD_STD = 0.15  # x std sqrt(hidden): logits of std ~4, peaked like a trained model's
PROMPT_TOKENS, GREEDY_TOKENS, SLOTS, SLOT_TOKENS, HELDOUT_TOKENS = 512, 256, 8, 64, 512
HELDOUT_DECODE_TOKENS = 128  # of those, fed one a step as decoding does (the one-row kernels)
REPLY_TOKENS, NEXT_TURN_TOKENS = 64, 64  # a chat's next turn: the prompt, a reply of these and a new message of these
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
    served, loading_anon_mb = with_peak_anonymous_mb(lambda: load_for_serving(weights, "cortex", "cpu", dtype, quantize))
    compiled = name.endswith("-compiled")
    if name.endswith("-fp32-prefill"):  # prompts multiplied in fp32, as before native bf16 prefills (checkpoint.py)
        for module in served.model.modules():
            if isinstance(module, (StoredLinear, StoredMLP, StoredRoutedExperts)):
                module.prefill_dtype = None
    prefill = next((module.prefill_dtype for module in served.model.modules() if isinstance(module, StoredMLP)), None)
    loaded = time.perf_counter()
    engine = Engine(served.model, served.tokenizer, slots=SLOTS, max_queue=SLOTS, seed=0, compile=compiled)
    compile_s = time.perf_counter() - loaded  # the Engine's warm-up compiles every decode graph (cold cache or not)
    startup_s = time.perf_counter() - start
    ids = held_out_ids(served.tokenizer, max(HELDOUT_TOKENS, PROMPT_TOKENS + NEXT_TURN_TOKENS))
    prompt, next_message = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:PROMPT_TOKENS + NEXT_TURN_TOKENS]
    ids = ids[:HELDOUT_TOKENS]

    def ttft(prompt: list[int]) -> float:
        sent = time.perf_counter()
        _, times = run_request(engine, prompt, SamplingParams(temperature=0.0, max_new_tokens=1))
        return times[0] - sent

    def client():  # in its own thread while this one decodes, as app.py serves
        ttft_s = ttft(prompt)
        reply, _ = run_request(engine, prompt, SamplingParams(temperature=0.0, max_new_tokens=REPLY_TOKENS))
        next_turn_s = ttft([*prompt, *reply, *next_message])
        engine.reuse_prefixes = False
        next_turn_whole_s = ttft([*prompt, *reply, *next_message])
        engine.reuse_prefixes = True
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
        return ttft_s, next_turn_s, next_turn_whole_s, greedy, decode_tps, slots_tps

    ttft_s, next_turn_s, next_turn_whole_s, greedy, decode_tps, slots_tps = engine.run_beside(client)
    with torch.no_grad():
        logits = served.model(torch.tensor([ids]))["logits"][0].float()
        decode_logits = teacher_forced_steps(served.model, ids[:HELDOUT_DECODE_TOKENS])
    torch.save({"greedy": greedy, "logits": logits, "decode_logits": decode_logits}, out)
    return {"format": name, "dtype": dtype, "quantize": quantize, "compile": compiled,
            "prefill_dtype": str(prefill).removeprefix("torch.") if prefill else dtype,
            "startup_s": round(startup_s, 2), **({"compile_s": round(compile_s, 1)} if compiled else {}),
            "ttft_512_s": round(ttft_s, 3), "ttft_next_turn_s": round(next_turn_s, 3),
            "ttft_next_turn_without_reuse_s": round(next_turn_whole_s, 3), "decode_tok_s_batch1": round(decode_tps, 2),
            f"decode_tok_s_{SLOTS}_slots": round(slots_tps, 2), "greedy_tokens": len(greedy),
            "rss_mb": resident_mb(), "peak_rss_mb": resident_mb("VmHWM"), "loading_peak_anonymous_mb": loading_anon_mb}


def teacher_forced_steps(model: CortexModel, ids: list[int]) -> torch.Tensor:
    """The logits of ids fed one token a step through a KV cache (len(ids), V) fp32: as decoding computes them, where
    the stored formats multiply one row in their one-row kernels (a prefill's logits never reach those)."""
    cache, steps = KVCache(max_length=len(ids)), []
    for position, token in enumerate(ids):
        output = model(torch.tensor([[token]]), position_ids=torch.tensor([[position]]), past_key_values=cache)
        steps.append(output["logits"][0, -1].float())
    return torch.stack(steps)


def with_peak_anonymous_mb(load):
    """(load(), the peak of the process's memory not backed by a file while it ran, MB): RssAnon sampled every 5 ms.
    VmHWM counts the weights file's mapped pages too, which the kernel can drop."""
    peak, done = [resident_mb("RssAnon")], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], resident_mb("RssAnon"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return load(), max(peak[0], resident_mb("RssAnon"))
    finally:
        done.set()
        sampler.join()


def resident_mb(field: str = "VmRSS") -> int:
    """The process's resident memory now (VmRSS), after serving; VmHWM: its peak, loading included (this process's
    own: getrusage's peak would count the parent's, which survives the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024)
    raise RuntimeError(f"no {field} in /proc/self/status")


def quality(reference: dict, other: dict) -> dict:
    ref, got = reference["greedy"], other["greedy"]
    same = [a == b for a, b in zip(ref, got)]
    first_diff = same.index(False) if False in same else len(same)
    return {"greedy_agreement": round(sum(same) / max(len(ref), 1), 3), "greedy_first_difference": first_diff,
            "heldout_argmax_agreement": round((reference["logits"].argmax(-1) == other["logits"].argmax(-1))
                                              .float().mean().item(), 3),
            "max_logit_error": round((reference["logits"] - other["logits"]).abs().max().item(), 3),
            "logit_range": round(reference["logits"].abs().max().item(), 2)} | ({
        "heldout_decode_argmax_agreement": round((reference["decode_logits"].argmax(-1)
                                                  == other["decode_logits"].argmax(-1)).float().mean().item(), 3),
        "decode_max_logit_error": round((reference["decode_logits"] - other["decode_logits"]).abs().max().item(), 3),
    } if "decode_logits" in other else {})


def measure_llama_cpp(name: str, gguf: Path, out: Path) -> dict:
    """In a fresh process: llama.cpp's figures on one GGUF export, timed as measure_format times ours."""
    import llama_cpp

    threads = torch.get_num_threads()  # OMP_NUM_THREADS, as ours
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_batch=PROMPT_TOKENS, n_threads=threads,
                          n_threads_batch=threads, verbose=False)  # logits of the last position only
    startup_s = time.perf_counter() - start
    from trainer.tokenizer import get_tokenizer
    ids = held_out_ids(get_tokenizer("cortex"), PROMPT_TOKENS + NEXT_TURN_TOKENS)
    prompt, next_message = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:]
    sent = time.perf_counter()
    llm.eval(prompt)
    reply = [int(last_logits(llm).argmax())]
    ttft_s = time.perf_counter() - sent
    while len(reply) < REPLY_TOKENS:
        llm.eval(reply[-1:])
        reply.append(int(last_logits(llm).argmax()))
    sent = time.perf_counter()
    llm.eval([reply[-1], *next_message])  # the cache holds the prompt and the reply but its last token
    last_logits(llm).argmax()
    next_turn_s = time.perf_counter() - sent
    llm.reset()
    llm.eval(prompt[:16])
    greedy, times = [int(last_logits(llm).argmax())], [time.perf_counter()]
    while len(greedy) < GREEDY_TOKENS:
        llm.eval(greedy[-1:])
        greedy.append(int(last_logits(llm).argmax()))
        times.append(time.perf_counter())
    figures = {"format": name, "gguf_type": LLAMA_CPP[name], "llama_cpp_python": llama_cpp.__version__,
               "threads": threads, "startup_s": round(startup_s, 2), "ttft_512_s": round(ttft_s, 3),
               "ttft_next_turn_s": round(next_turn_s, 3),
               "decode_tok_s_batch1": round((len(times) - 1) / (times[-1] - times[0]), 2), "rss_mb": resident_mb(),
               "peak_rss_mb": resident_mb("VmHWM")}
    del llm  # the held-out logits of every position need logits_all (a load of its own, not timed)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_batch=PROMPT_TOKENS, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    ids = held_out_ids(get_tokenizer("cortex"), HELDOUT_TOKENS)
    llm.eval(ids)
    torch.save({"greedy": greedy, "logits": torch.from_numpy(llm.scores[:len(ids)].copy()).float()}, out)
    return figures


def last_logits(llm):
    """The logits of the last token llm.eval'd: llama-cpp-python fills llm.scores only with logits_all (0.3.x)."""
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def measure_decode_steps(rounds: int, steps: int = 20, prompt_tokens: int = 16) -> dict:
    """Bare decode steps at batch 1 (no Engine), in this process: fp32 and bf16 eager, bf16 weights and int8 eager and
    compiled (the step of app.py --quantize ... --compile), and where cpu_gemv.c is built the stored formats again on
    torch's kernels alone; alternating, rounds times; ms of wall and of process CPU time per step. And the eager
    formats' products alone (decode_products), alternating the same way."""
    torch.manual_seed(0)
    fp32 = CortexModel(cortex_2_5_config(long_context=True)).eval()
    models = {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16),
              "bf16 weights": store_weights(copy.deepcopy(fp32), "bf16"),
              "int8": store_weights(copy.deepcopy(fp32), "int8")}
    prompt = torch.randint(0, fp32.config.vocab_size, (1, prompt_tokens))

    def run(model: CortexModel, compiled: bool, native_gemv: bool, count: int) -> list[float]:
        cpu_gemv.enabled = native_gemv
        cache = KVCache(max_length=prompt_tokens + steps + 1)  # one size: the compiled graph is made once
        model(prompt, past_key_values=cache)
        decoder = CompiledDecoder(model, cache, None) if compiled else None
        token, wall, cpu = torch.tensor([3]), time.perf_counter(), time.process_time()
        for position in range(prompt_tokens, prompt_tokens + count):
            positions = torch.tensor([[position]])
            logits = (decoder.step(token, positions) if compiled else
                      model(token[:, None], position_ids=positions, past_key_values=cache)["logits"][:, -1])
            token = logits.argmax(-1)
        return [round((time.perf_counter() - wall) / count * 1e3, 1),
                round((time.process_time() - cpu) / count * 1e3, 1)]

    def run_products(products: list, native_gemv: bool, count: int) -> list[float]:
        cpu_gemv.enabled = native_gemv
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            for product in products:
                product()
        return [round((time.perf_counter() - wall) / count * 1e3, 1),
                round((time.process_time() - cpu) / count * 1e3, 1)]

    native = cpu_gemv.enabled  # cpu_gemv.c built and loaded by store_weights: compared with torch's kernels
    variants = {"fp32 eager": (fp32, False, False), "bf16 eager": (models["bf16"], False, False)}
    products = {name: (decode_products(models[name]), False) for name in ("fp32", "bf16")}
    for name in ("bf16 weights", "int8"):
        calls = decode_products(models[name])
        for kernel, native_gemv in (("", native), (", torch's kernels", False)) if native else (("", False),):
            variants[f"{name} eager{kernel}"] = (models[name], False, native_gemv)
            variants[f"{name} compiled{kernel}"] = (models[name], True, native_gemv)
            products[f"{name}{kernel}"] = (calls, native_gemv)
    with torch.inference_mode():
        compile_s = {}
        for name, (model, compiled, native_gemv) in variants.items():
            if compiled:  # the graph made before timing
                wall, cpu = time.perf_counter(), time.process_time()
                run(model, compiled, native_gemv, 1)
                compile_s[name] = {"wall": round(time.perf_counter() - wall, 1),  # the C++ compiler's is not counted:
                                   "this_process_cpu": round(time.process_time() - cpu, 1)}
        for calls, native_gemv in products.values():
            run_products(calls, native_gemv, 1)
        ms = {name: [] for name in variants}
        products_ms = {name: [] for name in products}
        for _ in range(rounds):  # alternating
            for name, (model, compiled, native_gemv) in variants.items():
                ms[name].append(run(model, compiled, native_gemv, steps))
            for name, (calls, native_gemv) in products.items():
                products_ms[name].append(run_products(calls, native_gemv, steps))
    cpu_gemv.enabled = native
    return {"model": "Cortex 2.5 full config, random weights, seed 0", "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(), "cpu_capability_mkldnn_bf16": cpu_features(),
            "kernels": {name: kernels(name) for name in ("bf16", "int8")}, "compile_s": compile_s,
            "decode_ms_per_step_batch1 [wall, cpu] per round": ms,
            "products_alone_ms_per_step [wall, cpu] per round": products_ms,
            "products_per_step": {name: len(calls) for name, (calls, _) in products.items()}}


def decode_products(model: CortexModel) -> list:
    """One batch-1 decode step's matrix products, in order, as closures over the model's own weights and a random row
    each: every linear layer (the stored formats' MLPs: gate and up in one) and the head, and in each MoE layer two
    routed experts. Their time alone is the floor the format's kernels set for a step: the rest is norms, attention,
    routing and the Python that drives them."""
    calls, hidden, dtype = [], model.config.hidden_size, model.embed_tokens.weight.dtype
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):  # the head (LMHead) too
            x = torch.randn(1, 1, module.in_features, dtype=dtype)
            calls.append(functools.partial(nn.Linear.forward, module, x))
        elif isinstance(module, StoredLinear):  # with its casts to and from its kernel's dtype
            x = torch.randn(1, 1, module.stored_weight()[0].shape[-1], dtype=dtype)
            calls.append(functools.partial(module, x))
        elif isinstance(module, StoredMLP):  # gate and up in one product
            calls.append(functools.partial(module, torch.randn(1, hidden, dtype=dtype)))
        elif isinstance(module, (RoutedExperts, StoredRoutedExperts)):
            layer = int(name.split(".")[1])  # layers.{i}.mlp.experts
            expert = stored_expert if isinstance(module, StoredRoutedExperts) else looped_expert
            weights = module.weights() if isinstance(module, StoredRoutedExperts) else (module,)
            calls += [functools.partial(expert, *weights, picked, torch.randn(1, hidden, dtype=dtype))
                      for picked in (layer % module.num_experts, (layer + 1) % module.num_experts)]  # two of them
    return calls


def looped_expert(experts: RoutedExperts, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One routed expert on x as RoutedExperts._looped runs it."""
    gate, up, down = (getattr(experts, name)[expert] for name in RoutedExperts.WEIGHTS)
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def export_gguf(weights: Path, gguf_type: str) -> Path:
    import export

    return export.export(weights, "gguf", weights.with_name(f"cortex-{gguf_type}.gguf"), "cortex", gguf_type=gguf_type)


def write_random_weights(path: Path):
    torch.manual_seed(0)
    model = CortexModel(cortex_2_5_config(long_context=True))
    torch.nn.init.normal_(model.lm_head.weight, std=LM_HEAD_STD)
    save_weights(model, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default=",".join([*DEFAULT_FORMATS, *LLAMA_CPP]),
                        help=f"comma-separated from {', '.join([*FORMATS, *LLAMA_CPP])}, fp32 first (the "
                             "reference); llama.cpp rows need llama-cpp-python; *-compiled: the server's --compile")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the formats, alternating their order")
    parser.add_argument("--decode-steps", action="store_true",
                        help="only bare batch-1 decode steps in one process: fp32 and bf16 eager, bf16 weights and "
                             "int8 eager and compiled (also on torch's kernels alone), and the formats' products alone")
    parser.add_argument("--one", nargs=3, metavar=("FORMAT", "WEIGHTS", "OUT"), help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.one:
        name, path, out = args.one
        figures = (measure_llama_cpp(name, Path(path), Path(out)) if name in LLAMA_CPP
                   else measure_format(name, Path(path), Path(out)))
        print(json.dumps(figures))
        return
    if args.decode_steps:
        print(json.dumps(measure_decode_steps(args.rounds), indent=1))
        return
    formats = args.formats.split(",")
    if formats[0] != "fp32" or not set(formats) <= {*FORMATS, *LLAMA_CPP}:
        parser.error(f"--formats must start with fp32 and name only {', '.join([*FORMATS, *LLAMA_CPP])}")
    missing = {}
    if any(name in LLAMA_CPP for name in formats):
        try:
            import llama_cpp  # noqa: F401
        except ImportError as err:
            missing = {name: {"missing": f"llama-cpp-python is not importable ({err}); pip install llama-cpp-python"}
                       for name in formats if name in LLAMA_CPP}
            formats = [name for name in formats if name not in LLAMA_CPP]
    capability, native_bf16 = cpu_features()
    prefill = prefill_dtype(torch.device("cpu"), torch.float32, native_bf16)
    cpu_gemv_missing = cpu_gemv.load()  # as the children do: built or not, so kernels() says what ran
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "cortex.bin"
        write_random_weights(weights)
        inputs = {name: export_gguf(weights, LLAMA_CPP[name]) if name in LLAMA_CPP else weights for name in formats}
        runs = {name: [] for name in formats}
        for round_idx in range(args.rounds):
            for name in (formats if round_idx % 2 == 0 else formats[::-1]):
                child = subprocess.run([sys.executable, __file__, "--one", name, str(inputs[name]), f"{tmp}/{name}.pt"],
                                       capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO_ROOT)})
                if child.returncode != 0:
                    raise SystemExit(f"measuring {name} failed:\n{child.stderr[-3000:]}")
                runs[name].append(json.loads(child.stdout.strip().splitlines()[-1]))
        saved = {name: torch.load(f"{tmp}/{name}.pt") for name in formats}
    results = {}
    for name, figures in runs.items():
        merged = {key: round(statistics.median(run[key] for run in figures), 3) if isinstance(value, float) else value
                  for key, value in figures[0].items()}
        results[name] = merged | ({} if name == "fp32" else quality(saved["fp32"], saved[name]))
    fp32_decode = results["fp32"]["decode_tok_s_batch1"]
    for name, figures in results.items():
        figures["decode_vs_fp32"] = round(figures["decode_tok_s_batch1"] / fp32_decode, 2)
    for ours, theirs in (("bf16-weights", "llama.cpp-f16"), ("bf16", "llama.cpp-f16"),
                         ("bf16-weights-bf16-compute", "llama.cpp-f16"), ("int8", "llama.cpp-q8_0"),
                         ("int8-bf16-compute", "llama.cpp-q8_0"),
                         ("bf16-weights-compiled", "llama.cpp-f16"), ("int8-compiled", "llama.cpp-q8_0")):
        if ours in results and theirs in results:
            results[ours]["decode_vs_llama_cpp"] = round(results[ours]["decode_tok_s_batch1"]
                                                         / results[theirs]["decode_tok_s_batch1"], 2)
    print(json.dumps({
        "model": "Cortex 2.5 full config (cortex_2_5_config(long_context=True)), random weights, seed 0",
        "threads": torch.get_num_threads(), "rounds": args.rounds, "load_average": os.getloadavg(),
        "cpu_capability": capability, "mkldnn_bf16_supported": native_bf16,
        "cpu_gemv.c": (f"built and used for up to {cpu_gemv.MAX_ROWS} rows" if cpu_gemv_missing is None
                       else f"not used: {cpu_gemv_missing}"),
        "kernels": {"fp32": "F.linear fp32 (MKL/oneDNN sgemm)", "bf16": "F.linear bf16 (torch's bf16 GEMV for one "
                    "row; oneDNN GEMM for more, native only where mkldnn_bf16_supported)",
                    "bf16-weights": kernels("bf16", prefill), "int8": kernels("int8", prefill),
                    "*-fp32-prefill": "as above, longer prompts in fp32",
                    "*-compiled": "decode steps: one torch.compile'd graph (inductor C++); the linears, MLPs and head "
                                  "call the same kernels as eager (cpu_gemv.c's as the ops cortex::gemv and "
                                  "cortex::mlp), the routed experts run as one opaque op "
                                  "(cortex::stored_routed_experts, the eager code)",
                    "llama.cpp": "GGUF export (shared expert folded into each routed one: 1.27x the work per token; "
                                 "dense layer 0 as 8 identical experts, 2 of them computed)"},
        "formats": results | missing,
    }, indent=1))


if __name__ == "__main__":
    main()
