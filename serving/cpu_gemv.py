"""Decoding with stored weights (int8 with per-channel scales, or bf16; serving/quantize.py) on x86 CPUs with AVX2: a
few rows (up to MAX_ROWS: batch-1 decoding, several slots, a short prompt's rows per expert) times a layer (gemv), an
MLP (mlp) or one row's routed experts (experts), in cpu_gemv.c, with fp32 activations.

torch's own kernels for one row (torch._weight_int8pack_mm for int8, its bf16 GEMV for bf16, which also rounds the
activations to bf16) read the stored weights from memory at ~9-10 GB/s at two threads, on an AVX2 CPU and on a Zen 4
with AVX-512 and native bf16 alike; cpu_gemv.c reads them about twice as fast on both (README, "The full model on a
CPU"). For more rows it widens each weight once for four rows at a time: on an AVX2 CPU torch's bf16 path, emulated
there, took ~0.2 ms a row for a 2048x768 weight, and 8 rows took 1.6 ms against 0.4 ms here. A whole MLP is one call:
the Python between its products cost more than the products' time saved.

The C file is compiled on first use with the system's C compiler (the one `--compile`'s inductor needs too) into the
cache directory (CORTEX_CACHE_DIR, default ~/.cache/cortex), once per source, compiler and flags, and loaded with
ctypes. Where it cannot be (not x86 with AVX2, no compiler, a failed build) the stored formats keep torch's kernels and
load() says why. gemv() and mlp() run eagerly, or as their ops (cortex::gemv, cortex::mlp) in a graph being compiled;
only products of the stored formats with up to MAX_ROWS rows use them (serving/quantize.py).
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from trainer.tokenizer import cache_dir

SOURCE = Path(__file__).with_name("cpu_gemv.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-lm")  # -fopenmp: torch's libgomp, its threads
COLUMN_STEP = 32  # cpu_gemv.c reads a row 32 columns at a time
_KERNEL = None  # the loaded library, once load() succeeded
enabled = False  # whether the stored formats' products of a few rows use it: set by load(); False: torch's kernels
MAX_ROWS = 32  # the most rows it takes; a longer prompt multiplies as a GEMM (serving/quantize.py)


def load() -> str | None:
    """Builds (once, cached) and loads the kernel, and enables it. None when it is in use, else why it is not."""
    global _KERNEL, enabled
    if _KERNEL is None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return f"it is x86 code and this CPU is {platform.machine()}"
        capability = torch.backends.cpu.get_cpu_capability()
        if not capability.startswith(("AVX2", "AVX512")):  # torch's AVX2 level includes FMA
            return f"this CPU lacks AVX2 and FMA (torch's CPU capability: {capability})"
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            return "no C compiler found (install gcc, or set CC)"
        source = SOURCE.read_bytes()
        digest = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
        library = cache_dir() / f"cpu_gemv-{digest}.so"
        if not library.is_file():
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # built aside, then renamed: no half file
                built = Path(tmp) / library.name
                try:
                    result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True,
                                            text=True)
                except OSError as err:
                    return f"the C compiler {compiler} cannot be run: {err}"
                if result.returncode != 0:
                    return f"{compiler} could not build {SOURCE}: {result.stderr.strip()[-800:]}"
                os.replace(built, library)
            for stale in library.parent.glob("cpu_gemv-*.so"):  # earlier sources' builds (a loaded one stays mapped)
                if stale != library:
                    stale.unlink(missing_ok=True)
        try:
            loaded = ctypes.CDLL(str(library))
        except OSError as err:
            return f"{library} cannot be loaded ({err}); delete it to rebuild it"
        loaded.cortex_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        loaded.cortex_mlp.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        loaded.cortex_gemv.restype = loaded.cortex_mlp.restype = None
        _KERNEL = loaded
    enabled = True
    return None


def usable(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> bool:
    """Whether rows (n, in) times weight (out, in) can run in the kernel: loaded and enabled, up to MAX_ROWS rows on
    the CPU (the caller casts them to fp32), an int8 weight with fp32 scales (out) or a bf16 one without, contiguous
    tensors."""
    stored = ((weight.dtype == torch.int8 and scales is not None and scales.dtype == torch.float32)
              or (weight.dtype == torch.bfloat16 and scales is None))
    return (enabled and stored and 1 <= rows.shape[0] <= MAX_ROWS and rows.device.type == "cpu"
            and weight.shape[-1] % COLUMN_STEP == 0 and rows.is_contiguous() and weight.is_contiguous())


def gemv(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """_gemv, as the op cortex::gemv inside a graph being compiled."""
    return (gemv_op if torch.compiler.is_compiling() else _gemv)(rows, weight, scales)


def mlp(rows: torch.Tensor, gate_up: torch.Tensor, gate_up_scales: torch.Tensor | None, down: torch.Tensor,
        down_scales: torch.Tensor | None) -> torch.Tensor:
    """_mlp, as the op cortex::mlp inside a graph being compiled."""
    return (mlp_op if torch.compiler.is_compiling() else _mlp)(rows, gate_up, gate_up_scales, down, down_scales)


def _gemv(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """rows (n, in) fp32 @ weight (out, in).T -> (n, out) fp32, the weight int8 times scales (out, 1) or bf16 (scales
    None). Tensors as usable() checks; no conversions here: a call costs ~5 us beside the product."""
    out = torch.empty(rows.shape[0], weight.shape[0])
    _KERNEL.cortex_gemv(rows.data_ptr(), weight.data_ptr(), address(scales), out.data_ptr(), rows.shape[0],
                        weight.shape[0], weight.shape[1], torch.get_num_threads())
    return out


def _mlp(rows: torch.Tensor, gate_up: torch.Tensor, gate_up_scales: torch.Tensor | None, down: torch.Tensor,
         down_scales: torch.Tensor | None) -> torch.Tensor:
    """rows (n, H) fp32 -> down(silu(gate(rows)) * up(rows)) (n, H) fp32, gate and up one (2I, H) weight, each weight
    as in _gemv: one call for the three steps (the Python between them cost ~60 us an expert)."""
    hidden_size, intermediate_size = down.shape
    out, hidden = torch.empty(rows.shape[0], hidden_size), torch.empty(rows.shape[0], 2 * intermediate_size)
    _KERNEL.cortex_mlp(rows.data_ptr(), gate_up.data_ptr(), address(gate_up_scales), down.data_ptr(),
                       address(down_scales), hidden.data_ptr(), out.data_ptr(), rows.shape[0], hidden_size,
                       intermediate_size, torch.get_num_threads())
    return out


def experts(row: torch.Tensor, expert_ids: list[int], gate_up: torch.Tensor, gate_up_scales: torch.Tensor | None,
            down: torch.Tensor, down_scales: torch.Tensor | None) -> torch.Tensor:
    """row (1, H) fp32 through each of expert_ids -> (1, K, H) fp32: as _mlp() on each expert's slice of the stacked
    weights (E, 2I, H), (E, H, I) and scales (E, 2I), (E, H) or None, picked by address (no indexing ops: ~25 us an
    expert)."""
    hidden_size, intermediate_size = down.shape[1:]
    out, hidden = torch.empty(1, len(expert_ids), hidden_size), torch.empty(2 * intermediate_size)
    threads = torch.get_num_threads()
    for k, expert in enumerate(expert_ids):
        _KERNEL.cortex_mlp(row.data_ptr(), *(address(tensor, expert) for tensor in (
            gate_up, gate_up_scales, down, down_scales)), hidden.data_ptr(), address(out[0], k), 1,
            hidden_size, intermediate_size, threads)
    return out


def address(tensor: torch.Tensor | None, index: int = 0) -> int | None:
    """The address of tensor[index] (tensor contiguous), or NULL for None (a bf16 weight's scales)."""
    return None if tensor is None else tensor.data_ptr() + index * tensor.stride(0) * tensor.element_size()


# The ops for compiled graphs (opaque to inductor). Registered with torch.library.define/impl rather than custom_op,
# whose extra layers took 28 against 14 us a call in a compiled graph (~145 calls a decode step of the full model).
torch.library.define("cortex::gemv", "(Tensor rows, Tensor weight, Tensor? scales) -> Tensor")
torch.library.impl("cortex::gemv", "cpu", _gemv)
torch.library.define("cortex::mlp", "(Tensor rows, Tensor gate_up, Tensor? gate_up_scales, Tensor down, "
                                    "Tensor? down_scales) -> Tensor")
torch.library.impl("cortex::mlp", "cpu", _mlp)


@torch.library.register_fake("cortex::gemv")
def _(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


@torch.library.register_fake("cortex::mlp")
def _(rows: torch.Tensor, gate_up: torch.Tensor, gate_up_scales: torch.Tensor | None, down: torch.Tensor,
      down_scales: torch.Tensor | None) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], down.shape[0])


gemv_op, mlp_op = torch.ops.cortex.gemv.default, torch.ops.cortex.mlp.default
