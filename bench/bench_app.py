"""Benchmark of the chat server: time to first token and aggregate decode throughput for 1 and for N concurrent
streaming clients (continuous batching should make N clients several times faster in aggregate than one).

    python bench/bench_app.py                  # tiny model, 1 vs 8 clients; prints one JSON line
    python bench/bench_app.py --model small --clients 8 --requests 6 --max-tokens 128
    python bench/bench_app.py --checkpoint runs/mix    # a trained stage run dir instead of a random-init model
    python bench/bench_app.py --compile                # the server decodes with its torch.compile'd step

Without --checkpoint it writes a random-init model (tiny: tiny_config with the tiny BPE tokenizer's 2048 ids; small:
hidden 256, 4 layers, 8 experts) as a stage run dir. Its output layer is scaled up so that next-token distributions
are about as peaked as a trained model's (a random-init model's are nearly flat, which would make every top-p draw sort
the whole vocabulary). It starts `python3 app.py --checkpoint <dir> --port 0` as a separate process and drives it
through POST /v1/chat/completions with stream=true (no thinking, temperature 0.8, top-p 0.95, max_tokens fixed).
Each client sends its requests one after the other. TTFT = request sent -> first content chunk received; aggregate
tokens/s = completion tokens of all requests (from usage) / wall time of the round. 1-client and N-client rounds
alternate; the figures are medians over the rounds, the speedup the median of the per-round ratios.
"""

import argparse
import dataclasses
import http.client
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

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model import CortexModel, ModelConfig, MoEConfig, RoPEConfig, save_weights, tiny_config  # noqa: E402
from trainer.tokenizer import tiny_tokenizer  # noqa: E402


def model_config(name: str, vocab_size: int) -> ModelConfig:
    if name == "tiny":
        return dataclasses.replace(tiny_config(vocab_size), max_position_embeddings=1024)
    return ModelConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, attention_dropout=0.0,
                       rope_config=RoPEConfig(rope_type="default", rope_theta=1e6),
                       moe_config=MoEConfig(intermediate_size=384, n_dense_layer=1, num_experts_per_tok=2,
                                            n_shared_experts=1, n_routed_experts=8))


LM_HEAD_STD = 0.5  # logits with a std of about 4 (hidden RMS 1 x sqrt(64) x 0.5), like a confident trained model


def write_run_dir(path: Path, config: ModelConfig):
    torch.manual_seed(0)
    model = CortexModel(config)
    torch.nn.init.normal_(model.lm_head.weight, std=LM_HEAD_STD)
    save_weights(model, path / "model.safetensors")
    (path / "model_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    (path / "stage.json").write_text(json.dumps({"stage": "bench", "train_config": {"tokenizer": "tiny"}}))


def start_server(run_dir: Path, slots: int, threads: int, compile: bool) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
    server = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py"), "--checkpoint", str(run_dir), "--port", "0",
                               "--slots", str(slots), "--device", "cpu", "--seed", "0",
                               *(["--compile"] if compile else [])],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = server.stdout.readline()  # "Cortex chat (...) on http://127.0.0.1:PORT"
    if " on http://" not in line:
        server.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return server, int(line.rsplit(":", 1)[1])


def stream_once(port: int, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens)."""
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True, "thinking": False,
            "temperature": 0.8, "top_p": 0.95, "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    ttft, tokens = None, 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return ttft if ttft is not None else time.perf_counter() - start, tokens


def run_round(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    ttfts, tokens = [], []

    def client(c: int):
        for r in range(requests):
            ttft, n = stream_once(port, f"Client {c}, question {r}: tell me a story about the number {c * 100 + r}.",
                                  max_tokens)
            ttfts.append(ttft)
            tokens.append(n)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(tokens), "completion_tokens": sum(tokens),
            "aggregate_tokens_per_s": round(sum(tokens) / wall, 1),
            "per_client_tokens_per_s": round(sum(tokens) / wall / clients, 1),
            "ttft_ms_p50": round(1000 * statistics.median(ttfts), 1), "ttft_ms_max": round(1000 * max(ttfts), 1),
            "wall_s": round(wall, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "small"], default="tiny", help="random-init model size")
    parser.add_argument("--checkpoint", type=Path, help="serve this stage run dir instead of a random-init model")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the second round")
    parser.add_argument("--requests", type=int, default=6, help="requests per client (one after the other)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating 1-client and N-client rounds; medians are "
                                                              "reported, which evens out load from other processes")
    parser.add_argument("--compile", action="store_true", help="start the server with --compile")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            run_dir = args.checkpoint
            config = ModelConfig.from_dict(json.loads((run_dir / "model_config.json").read_text()))
        else:
            run_dir, config = Path(tmp), model_config(args.model, tiny_tokenizer().vocab_size)
            write_run_dir(run_dir, config)
        server, port = start_server(run_dir, slots=args.clients, threads=args.threads, compile=args.compile)
        try:
            stream_once(port, "warm up", 8)
            rounds = [(run_round(port, 1, args.requests, args.max_tokens),
                       run_round(port, args.clients, args.requests, args.max_tokens)) for _ in range(args.rounds)]
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps({
        "bench": "app", "model": str(args.checkpoint or args.model), "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers, "vocab": config.vocab_size, "device": "cpu",
        "server_threads": args.threads, "compile": args.compile, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "single": median_round([r[0] for r in rounds]), "concurrent": median_round([r[1] for r in rounds]),
        "aggregate_speedup": round(statistics.median(c["aggregate_tokens_per_s"] / s["aggregate_tokens_per_s"]
                                                     for s, c in rounds), 2),
        "aggregate_speedup_per_round": [round(c["aggregate_tokens_per_s"] / s["aggregate_tokens_per_s"], 2)
                                        for s, c in rounds],
    }))


def median_round(results: list[dict]) -> dict:
    """The median of every figure over the rounds."""
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


if __name__ == "__main__":
    main()
