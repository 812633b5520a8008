"""Batch-1 decoding with int8 weight-only weights on x86 CPUs with AVX2: one row times a layer (gemv), an MLP or a
row's routed experts (mlp, experts), in int8_gemv.c.

torch's own int8 kernel (torch._weight_int8pack_mm) reads int8 weights from memory at ~9 GB/s on an AVX2 CPU at two
threads (it is hand-vectorized for AVX-512 and ARM only); int8_gemv.c reads them at 16-20 GB/s there, with fp32
activations (torch's kernel wants bf16 ones). A whole MLP is one call: the Python between its products cost more than
the products' time saved. Figures: README, "The full model on a CPU".

The C file is compiled on first use with the system's C compiler (the one `--compile`'s inductor needs too) into the
cache directory (CORTEX_CACHE_DIR, default ~/.cache/cortex), once per source, compiler and flags, and loaded with
ctypes. Where it cannot be (not x86 with AVX2, no compiler, a failed build) the int8 format keeps torch's kernel and
load() says why. gemv() and mlp() run eagerly, or as their ops (cortex::int8_gemv, cortex::int8_mlp) in a graph being
compiled; only one-row products of the int8 format use them (serving/quantize.py).
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

SOURCE = Path(__file__).with_name("int8_gemv.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-lm")  # -fopenmp: torch's libgomp, its threads
COLUMN_STEP = 32  # int8_gemv.c reads a row 32 columns at a time
_KERNEL = None  # the loaded library, once load() succeeded
enabled = False  # whether the int8 format's one-row products use it: set by load(); False to compare with torch's


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
        library = cache_dir() / f"int8_gemv-{digest}.so"
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
        try:
            loaded = ctypes.CDLL(str(library))
        except OSError as err:
            return f"{library} cannot be loaded ({err}); delete it to rebuild it"
        loaded.cortex_int8_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        loaded.cortex_int8_mlp.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        loaded.cortex_int8_gemv.restype = loaded.cortex_int8_mlp.restype = None
        _KERNEL = loaded
    enabled = True
    return None


def usable(rows: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether rows (n, in) times weight_int8 (out, in) with scales (out) can run in the kernel: loaded and enabled,
    one row on the CPU (the caller casts it to fp32), fp32 scales, contiguous tensors."""
    return (enabled and rows.shape[0] == 1 and rows.device.type == "cpu" and weight_int8.shape[-1] % COLUMN_STEP == 0
            and scales.dtype == torch.float32 and rows.is_contiguous() and weight_int8.is_contiguous())


def gemv(row: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """_gemv, as the op cortex::int8_gemv inside a graph being compiled."""
    return (gemv_op if torch.compiler.is_compiling() else _gemv)(row, weight_int8, scales)


def mlp(row: torch.Tensor, gate_up_int8: torch.Tensor, gate_up_scales: torch.Tensor, down_int8: torch.Tensor,
        down_scales: torch.Tensor) -> torch.Tensor:
    """_mlp, as the op cortex::int8_mlp inside a graph being compiled."""
    return (mlp_op if torch.compiler.is_compiling() else _mlp)(row, gate_up_int8, gate_up_scales, down_int8,
                                                               down_scales)


def _gemv(row: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """row (1, in) fp32 @ (weight_int8 (out, in) * scales (out, 1)).T -> (1, out) fp32. Tensors as usable() checks;
    no conversions here: a call costs ~5 us beside the product."""
    out = torch.empty(1, weight_int8.shape[0])
    _KERNEL.cortex_int8_gemv(row.data_ptr(), weight_int8.data_ptr(), scales.data_ptr(), out.data_ptr(),
                             weight_int8.shape[0], weight_int8.shape[1], torch.get_num_threads())
    return out


def _mlp(row: torch.Tensor, gate_up_int8: torch.Tensor, gate_up_scales: torch.Tensor, down_int8: torch.Tensor,
         down_scales: torch.Tensor) -> torch.Tensor:
    """row (1, H) fp32 -> down(silu(gate(row)) * up(row)) (1, H) fp32, gate and up one (2I, H) int8 weight: one call
    for the three steps (the Python between them cost ~60 us an expert)."""
    hidden_size, intermediate_size = down_int8.shape
    out, hidden = torch.empty(1, hidden_size), torch.empty(2 * intermediate_size)
    _KERNEL.cortex_int8_mlp(row.data_ptr(), gate_up_int8.data_ptr(), gate_up_scales.data_ptr(), down_int8.data_ptr(),
                            down_scales.data_ptr(), hidden.data_ptr(), out.data_ptr(), hidden_size, intermediate_size,
                            torch.get_num_threads())
    return out


def experts(row: torch.Tensor, expert_ids: list[int], gate_up_int8: torch.Tensor, gate_up_scales: torch.Tensor,
            down_int8: torch.Tensor, down_scales: torch.Tensor) -> torch.Tensor:
    """row (1, H) fp32 through each of expert_ids -> (1, K, H) fp32: as _mlp() on each expert's slice of the stacked
    weights (E, 2I, H), (E, 2I), (E, H, I), (E, H), picked by address (no indexing ops: ~25 us an expert)."""
    hidden_size, intermediate_size = down_int8.shape[1:]
    out, hidden = torch.empty(1, len(expert_ids), hidden_size), torch.empty(2 * intermediate_size)
    threads = torch.get_num_threads()
    for k, expert in enumerate(expert_ids):
        _KERNEL.cortex_int8_mlp(row.data_ptr(), *(address(tensor, expert) for tensor in (
            gate_up_int8, gate_up_scales, down_int8, down_scales)), hidden.data_ptr(), address(out[0], k),
            hidden_size, intermediate_size, threads)
    return out


def address(tensor: torch.Tensor, index: int) -> int:
    """The address of tensor[index] (tensor contiguous)."""
    return tensor.data_ptr() + index * tensor.stride(0) * tensor.element_size()


# The ops for compiled graphs (opaque to inductor). Registered with torch.library.define/impl rather than custom_op,
# whose extra layers took 28 against 14 us a call in a compiled graph (~145 calls a decode step of the full model).
torch.library.define("cortex::int8_gemv", "(Tensor row, Tensor weight_int8, Tensor scales) -> Tensor")
torch.library.impl("cortex::int8_gemv", "cpu", _gemv)
torch.library.define("cortex::int8_mlp", "(Tensor row, Tensor gate_up_int8, Tensor gate_up_scales, "
                                         "Tensor down_int8, Tensor down_scales) -> Tensor")
torch.library.impl("cortex::int8_mlp", "cpu", _mlp)


@torch.library.register_fake("cortex::int8_gemv")
def _(row: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return row.new_empty(1, weight_int8.shape[0])


@torch.library.register_fake("cortex::int8_mlp")
def _(row: torch.Tensor, gate_up_int8: torch.Tensor, gate_up_scales: torch.Tensor, down_int8: torch.Tensor,
      down_scales: torch.Tensor) -> torch.Tensor:
    return row.new_empty(1, down_int8.shape[0])


gemv_op, mlp_op = torch.ops.cortex.int8_gemv.default, torch.ops.cortex.int8_mlp.default
