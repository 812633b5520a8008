"""The output head's cross-entropy step, plain (logits for every position, then F.cross_entropy) against the chunked
target scoring of model/head.py that the trainer uses: time and peak memory of forward + backward, side by side.

    python3 bench/bench_head.py                      # Cortex's head (hidden 768, vocab 46957), 8 x 512 positions
    python3 bench/bench_head.py --positions 2048     # smaller

Each variant runs in a fresh process so that its peak resident memory (ru_maxrss, Linux) is its own; the figure is the
growth over the process's size after the inputs were allocated. "cpu_seconds" (process CPU time) is the steadier figure
on a shared machine with OMP_NUM_THREADS=1. Prints one JSON line.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.head import target_log_probs  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_variant(variant: str, positions: int, hidden_size: int, vocab_size: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, hidden_size, generator=gen).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab_size, (positions,), generator=gen)
    base = peak_rss_mb()

    def step() -> tuple[float, float]:
        hidden.grad = weight.grad = None
        start, start_cpu = time.perf_counter(), time.process_time()
        if variant == "plain":
            loss = F.cross_entropy(F.linear(hidden, weight), targets)
        else:
            loss = -target_log_probs(hidden, weight, targets, summed=True)[0] / positions
        loss.backward()
        return time.perf_counter() - start, time.process_time() - start_cpu

    step()  # warm-up; the peak is reached here already
    wall, cpu = zip(*(step() for _ in range(repeats)))
    return {"seconds": round(statistics.median(wall), 3), "cpu_seconds": round(statistics.median(cpu), 3),
            "peak_extra_mb": round(peak_rss_mb() - base)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=8 * 512)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=46957)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["plain", "chunked"], help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.positions, args.hidden, args.vocab, args.repeats)))
        return
    result = {"benchmark": "head", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "positions": args.positions, "hidden": args.hidden, "vocab": args.vocab,
              "logits_mb_fp32": round(args.positions * args.vocab * 4 / 2**20)}
    for variant in ("plain", "chunked"):
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--positions", str(args.positions),
                                "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--repeats", str(args.repeats)],
                               capture_output=True, text=True, check=True)
        result[variant] = json.loads(child.stdout)
    result["speedup"] = round(result["plain"]["seconds"] / result["chunked"]["seconds"], 2)
    result["cpu_speedup"] = round(result["plain"]["cpu_seconds"] / result["chunked"]["cpu_seconds"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
