"""CPU benchmark of model/: training-step and decode throughput, against the reference llm_model 0.6.0 when installed.

    python bench/bench_model.py            # prints one JSON line
    OMP_NUM_THREADS=1 python bench/bench_model.py --cpu-time  # process CPU time, for a machine other jobs share

Config: the real vocabulary (46957), hidden 256, 4 layers (layer 0 dense), 4 heads / 2 KV heads, 8 routed experts top-2
+ 1 shared. Train step = forward + cross-entropy (+ 0.001 aux) + backward on a 4 x 256 batch, attention dropout 0, each
model computing its loss the way its trainer does: ours scores the targets with the chunked head (model/head.py, as
trainer/tasks.py does), the reference materialises the (4, 256, 46957) logits for F.cross_entropy.
"Body" = the same step with logits for the last position only (no 46957-way projection and cross-entropy).
Decode = batch 1, 16-token prompt, 256 new greedy tokens with a KV cache: ours is model.generate with compile=True (each
token one torch.compile'd step, model/compiled_decode.py; its compilation happens in the warm-up run) and, as
"ours_eager", without; the reference is a plain loop over LlmModel with its own KVCache. Both models hold the same
weights and are timed in alternating rounds; figures are medians, ratios the median of per-round ratios, which evens
out load from other processes.
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: model/ and tests/llm_reference.py

from model import CortexModel, ModelConfig, cortex_2_5_config, generate

VOCAB, BATCH, SEQ_LEN, PROMPT_LEN, NEW_TOKENS = 46957, 4, 256, 16, 256
TRAIN_ROUNDS, DECODE_ROUNDS = 9, 5
clock = time.perf_counter  # main() sets time.process_time for --cpu-time


def bench_config() -> ModelConfig:
    """Cortex 2.5's structure and vocabulary at a CPU-sized width and depth."""
    cortex = cortex_2_5_config()
    return replace(
        cortex,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.0,
        moe_config=replace(cortex.moe_config, intermediate_size=384),
    )


def reference_model(config: ModelConfig, state_dict):
    """The reference LlmModel with the same config and weights, or None when llm_model is not installed."""
    try:
        import llm_model

        from tests.llm_reference import reference_config
    except ImportError:
        return None
    ref = llm_model.LlmModel(reference_config(config))
    ref.load_state_dict(state_dict, strict=True)
    return ref


def train_step_seconds(model, input_ids, labels) -> float:
    model.train()
    start = clock()
    if isinstance(model, CortexModel):
        out = model(input_ids, targets=labels, sum_target_log_probs=True)
        cross_entropy = -out["target_log_probs"] / (labels != -100).sum()
    else:
        out = model(input_ids)
        cross_entropy = F.cross_entropy(out["logits"].view(-1, VOCAB), labels.view(-1))
    loss = cross_entropy + 0.001 * out["aux_loss"]
    loss.backward()
    elapsed = clock() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def body_step_seconds(model, input_ids, labels) -> float:
    """Forward + backward with logits for the last position only: the network without the vocabulary projection and
    cross-entropy over 46957 classes, which are the same matrix products in both models and most of a full step."""
    model.train()
    start = clock()
    out = model(input_ids, logits_to_keep=1)
    loss = out["logits"].square().mean() + 0.001 * out["aux_loss"]
    loss.backward()
    elapsed = clock() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def our_decode_seconds(model, prompt, compile: bool) -> float:
    start = clock()
    tokens = generate(model, prompt, max_new_tokens=NEW_TOKENS, compile=compile)
    elapsed = clock() - start
    assert len(tokens) == NEW_TOKENS
    return elapsed


@torch.no_grad()
def reference_decode_seconds(ref, prompt) -> float:
    from llm_model import KVCache

    ref.eval()
    start = clock()
    cache = KVCache()
    logits = ref(torch.tensor([prompt]), past_key_values=cache, use_cache=True)["logits"]
    for _ in range(NEW_TOKENS - 1):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        logits = ref(token, past_key_values=cache, use_cache=True)["logits"]
    logits[:, -1].argmax(dim=-1)
    return clock() - start


def timed_rounds(runners: dict, run, rounds: int) -> dict[str, list[float]]:
    """One warm-up run each, then `rounds` rounds that run every entry once, alternating (so load hits both alike)."""
    for runner in runners.values():
        run(runner)
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name].append(run(runner))
    return times


def main():
    global clock
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU time instead of wall time")
    if parser.parse_args().cpu_time:
        clock = time.process_time
    torch.manual_seed(0)
    config = bench_config()
    ours = CortexModel(config)
    ref = reference_model(config, ours.state_dict())
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ_LEN))
    labels = torch.cat((input_ids[:, 1:], torch.full((BATCH, 1), -100)), dim=1)
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,)).tolist()

    models = {"ours": ours} | ({"reference": ref} if ref is not None else {})
    train = timed_rounds(models, lambda model: train_step_seconds(model, input_ids, labels), TRAIN_ROUNDS)
    body = timed_rounds(models, lambda model: body_step_seconds(model, input_ids, labels), TRAIN_ROUNDS)
    decoders = {
        "ours": lambda: our_decode_seconds(ours, prompt, compile=True),
        "ours_eager": lambda: our_decode_seconds(ours, prompt, compile=False),
    } | ({"reference": lambda: reference_decode_seconds(ref, prompt)} if ref is not None else {})
    decode = timed_rounds(decoders, lambda decoder: decoder(), DECODE_ROUNDS)

    tokens = BATCH * SEQ_LEN
    result = {
        "benchmark": "model",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": clock.__name__,
        "config": "vocab 46957, hidden 256, 4 layers (1 dense), 4/2 heads, 8 experts top-2 + 1 shared, ffn 768/384, fp32",
        "train_batch": f"{BATCH}x{SEQ_LEN}",
        "train_tokens_per_s": {n: round(tokens / statistics.median(t), 1) for n, t in train.items()},
        "train_body_tokens_per_s": {n: round(tokens / statistics.median(t), 1) for n, t in body.items()},
        "decode_tokens_per_s": {n: round(NEW_TOKENS / statistics.median(t), 1) for n, t in decode.items()},
    }
    if ref is not None:  # median over rounds of the per-round ratio: robust to load that changes between rounds
        for key, times in (("train_tokens_per_s", train), ("train_body_tokens_per_s", body), ("decode_tokens_per_s", decode)):
            result[key]["ratio"] = round(statistics.median(r / o for o, r in zip(times["ours"], times["reference"])), 2)
        result["decode_tokens_per_s"]["ratio_eager"] = round(
            statistics.median(r / o for o, r in zip(decode["ours_eager"], decode["reference"])), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
