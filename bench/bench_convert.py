"""Converting the original's .pkl token files into our .npy files: the streaming opcode reader of
trainer/token_files.py against unpickling the whole file (the previous conversion: pickle.load under an unpickler that
refuses every global, then numpy arrays), side by side on the same pickles; peak memory and tokens/s.

    python3 bench/bench_convert.py                                   # pretrain pickles of 1M, 10M and 50M tokens,
                                                                     # and 10M-token SFT, DPO and GRPO pickles
    python3 bench/bench_convert.py --sizes 1 10 --kinds pretrain     # smaller

The pickles are written by the real pickle module with the original's protocol (pickle.dump's default, 4), token ids
drawn uniformly from Cortex's 46957. Times are wall-clock and CPU (user + system: steadier on a shared machine),
medians over alternating rounds. Each conversion runs in a fresh process so that its peak resident memory
(VmHWM) is its own; both conversions must give identical files (checked token by token). Prints one JSON line.
"""

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.token_files import (COLLECTION_FIELDS, RaggedTokens, collection_paths, convert_pickle,  # noqa: E402
                                 load_collection, load_stream, save_collection, save_stream)

VOCAB = 46957
ITEM_TOKENS = {"sft": (50, 2048), "dpo": (50, 1024), "grpo": (50, 300)}  # item (field) lengths drawn uniformly


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (Linux), which exec resets, where ru_maxrss would keep the size of
    the process that spawned it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_pickle(kind: str, tokens: int, path: Path, seed: int = 0) -> None:
    """An original-format pickle of about `tokens` token ids (run in a child: the Python lists cost ~36 B a token)."""
    rng = np.random.default_rng(seed)
    if kind == "pretrain":
        obj = rng.integers(0, VOCAB, tokens).tolist()
    else:
        low, high = ITEM_TOKENS[kind]
        fields = COLLECTION_FIELDS[kind]
        item_tokens = sum((low + high) // 2 if field != "answer" else 2 for field in fields)
        items = tokens // item_tokens or 1
        if kind == "sft":
            obj = [rng.integers(0, VOCAB, rng.integers(low, high)).tolist() for _ in range(items)]
        else:
            obj = [{field: rng.integers(0, VOCAB, rng.integers(low, high) if field != "answer" else
                                        rng.integers(1, 4)).tolist() for field in fields} for _ in range(items)]
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


class _RefuseGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def unpickle_convert(path: Path, kind: str, out: Path) -> None:
    """The previous conversion: the whole pickle unpickled into Python objects, then numpy arrays."""
    with open(path, "rb") as f:
        obj = _RefuseGlobals(f).load()
    if kind == "pretrain":
        save_stream(out, np.asarray(obj).astype(np.int64), VOCAB)
        return
    fields = COLLECTION_FIELDS[kind]
    per_field = {None: obj} if fields == (None,) else {field: [item[field] for item in obj] for field in fields}
    save_collection(out, kind, {field: RaggedTokens.from_sequences([np.asarray(s, dtype=np.int64) for s in seqs],
                                                                   np.dtype(np.int64))
                                for field, seqs in per_field.items()}, VOCAB)


def run_child(variant: str, kind: str, path: Path, out: Path) -> dict:
    base = peak_rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    if variant == "streaming":
        convert_pickle(path, kind, VOCAB, out)
    else:
        unpickle_convert(path, kind, out)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "peak_rss_mb": peak_rss_mb(), "start_rss_mb": base}


def in_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode:
        raise RuntimeError(f"child {args} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}


def token_count(kind: str, out: Path) -> int:
    if kind == "pretrain":
        return len(load_stream(out, VOCAB))
    return sum(len(r.tokens) for r in load_collection(out, kind, VOCAB).values())


def identical(kind: str, a: Path, b: Path) -> bool:
    files = [(a, b)] if kind == "pretrain" else \
        [(pa, pb) for field in COLLECTION_FIELDS[kind] for pa, pb in zip(collection_paths(a, field),
                                                                         collection_paths(b, field))]
    for pa, pb in files:
        x, y = np.load(pa, mmap_mode="r"), np.load(pb, mmap_mode="r")
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        step = 1 << 24
        if any(not np.array_equal(x[i:i + step], y[i:i + step]) for i in range(0, len(x), step)):
            return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 50], help="pretrain sizes, M tokens")
    parser.add_argument("--collection-size", type=float, default=10, help="SFT/DPO/GRPO size, M tokens")
    parser.add_argument("--kinds", nargs="+", default=["pretrain", "sft", "dpo", "grpo"])
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds; medians are reported")
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "KIND", "PKL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--write", nargs=3, metavar=("KIND", "TOKENS", "PKL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, kind, path, out = args.child
        print(json.dumps(run_child(variant, kind, Path(path), Path(out))))
        return
    if args.write:
        write_pickle(args.write[0], int(args.write[1]), Path(args.write[2]))
        return

    cases = [("pretrain", size) for size in args.sizes if "pretrain" in args.kinds] + \
            [(kind, args.collection_size) for kind in args.kinds if kind != "pretrain"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, size in cases:
            pkl = tmp / f"{kind}.pkl"
            in_child("--write", kind, str(int(size * 1e6)), str(pkl))
            outs = {variant: tmp / f"{kind}.{variant}.npy" for variant in ("streaming", "unpickle")}
            runs = {variant: [] for variant in outs}
            for _ in range(args.repeats):
                for variant, out in outs.items():
                    runs[variant].append(in_child("--child", variant, kind, str(pkl), str(out)))
            check_seconds = None
            if kind == "pretrain":  # the range check of every .npy token file, once per file and process
                start = time.perf_counter()
                load_stream(outs["streaming"], VOCAB)
                check_seconds = time.perf_counter() - start
            tokens = token_count(kind, outs["streaming"])
            row = {"kind": kind, "tokens": tokens, "pkl_mb": round(pkl.stat().st_size / 2**20, 1),
                   "identical": identical(kind, outs["streaming"], outs["unpickle"])}
            for variant, results in runs.items():
                seconds = float(np.median([r["seconds"] for r in results]))
                cpu_seconds = float(np.median([r["cpu_seconds"] for r in results]))
                row[variant] = {"seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds),
                                "cpu_seconds": round(cpu_seconds, 2), "tokens_per_cpu_s": round(tokens / cpu_seconds),
                                "peak_rss_mb": round(max(r["peak_rss_mb"] for r in results)),
                                "start_rss_mb": round(results[0]["start_rss_mb"])}
            if check_seconds is not None:
                row["load_range_check_tokens_per_s"] = round(tokens / check_seconds)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            for path in tmp.iterdir():
                path.unlink()
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
