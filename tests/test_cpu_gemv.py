"""serving/cpu_gemv.py: the stored formats' products of a few rows (cpu_gemv.c, x86 with AVX2), its build, and the
fallback to torch's kernels where it cannot be built."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.mlp import MLP
from model.moe import RoutedExperts
from serving import cpu_gemv
from serving.quantize import (StoredLinear, StoredMLP, StoredRoutedExperts, quantize_per_channel, unpacked,
                              uses_gemv)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernel():
    why_not = cpu_gemv.load()
    if why_not is not None:
        pytest.skip(f"cpu_gemv.c cannot run here: {why_not}")


def stored_weight(weight: torch.Tensor, weight_format: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """weight as cpu_gemv takes it: int8 and its scales, or bf16 and None."""
    return quantize_per_channel(weight) if weight_format == "int8" else (weight.to(torch.bfloat16), None)


def as_float64(weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    return weight.double() * (1 if scales is None else scales.double()[:, None])


@pytest.mark.parametrize("weight_format", ["int8", "bf16"])
def test_each_output_is_the_stored_weights_times_the_row(kernel, weight_format):
    generator = torch.Generator().manual_seed(0)
    for rows, cols in ((1, 32), (7, 64), (300, 768), (2048, 1024)):
        weight = torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator) * 3
        weight, scales = stored_weight(weight, weight_format)
        for n in (1, 2, 5, 8, 32):  # one row, and several: four at a time, the last group short
            x = torch.randn(n, cols, generator=generator)
            expected = x.double() @ as_float64(weight, scales).T
            got = cpu_gemv.gemv(x, weight, scales)
            assert got.shape == (n, rows) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    row = x[:1]
    threads = torch.get_num_threads()
    try:  # rows split over threads: each output is still one thread's sum, the same at any thread count
        torch.set_num_threads(1)
        one = cpu_gemv.gemv(row, weight, scales)
        torch.set_num_threads(2)
        assert torch.equal(cpu_gemv.gemv(row, weight, scales), one)
    finally:
        torch.set_num_threads(threads)


def test_a_weight_it_does_not_take_stays_on_torchs_kernels(kernel):
    row, weight = torch.randn(1, 64), torch.randn(8, 64)
    weight_int8, scales = quantize_per_channel(weight)
    assert cpu_gemv.usable(row, weight_int8, scales) and cpu_gemv.usable(row, weight.bfloat16(), None)
    for args in ((weight_int8, None), (weight_int8, scales.bfloat16()), (weight.bfloat16(), scales), (weight, None),
                 (weight_int8[:, :48], scales)):  # no scales, bf16 scales, scales with bf16, fp32, 48 columns
        assert not cpu_gemv.usable(row, *args)
    assert cpu_gemv.usable(torch.randn(cpu_gemv.MAX_ROWS, 64), weight_int8, scales)
    assert not cpu_gemv.usable(torch.randn(cpu_gemv.MAX_ROWS + 1, 64), weight_int8, scales)  # a prompt: a GEMM


def with_torchs_kernel(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    cpu_gemv.enabled = False
    try:
        return module(*inputs)
    finally:
        cpu_gemv.enabled = True


@pytest.mark.parametrize("weight_format", ["int8", "bf16"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_few_rows_of_the_stored_layers_run_in_it_eager_and_in_a_compiled_graph(kernel, weight_format, n):
    torch.manual_seed(0)
    linear = StoredLinear(nn.Linear(64, 96, bias=False), weight_format)
    mlp = StoredMLP(MLP(64, 32), weight_format)
    row = torch.randn(n, 64)  # batch-1 decoding, or three slots
    with torch.no_grad():
        gate, up = F.linear(row, unpacked(mlp.stored_weight("gate_up_proj_"), torch.float32)).chunk(2, dim=-1)
        expected = {linear: row @ unpacked(linear.stored_weight(), torch.float32).T,
                    mlp: F.linear(F.silu(gate) * up, unpacked(mlp.stored_weight("down_proj_"), torch.float32))}
        for module, want in expected.items():
            got = module(row)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32 activations: the stored weights' product
            # torch's kernels take bf16 activations: ~100x further off, so the close result above was this kernel's
            assert (with_torchs_kernel(module, row) - want).abs().max() > 10 * (got - want).abs().max()
            # the compiled decode step: cortex::gemv or cortex::mlp in the graph (fullgraph: no break around ctypes)
            torch.testing.assert_close(torch.compile(module, fullgraph=True)(row), got)


def test_a_bf16_model_keeps_int8_scales_in_fp32_and_one_row_in_it(kernel):
    # --dtype bfloat16 --quantize int8: bf16 prefill, int8 decoding in the kernel (it takes fp32 scales)
    torch.manual_seed(0)
    linear = StoredLinear(nn.Linear(64, 96, bias=False), "int8").to(torch.bfloat16)
    assert (linear.weight_int8.dtype, linear.scales.dtype, linear.kernel_scales.dtype) == (
        torch.int8, torch.float32, torch.bfloat16)
    row = torch.randn(1, 64).bfloat16()
    assert uses_gemv(row, linear.stored_weight())
    with torch.no_grad():
        got = linear(row)
    want = row.double() @ unpacked(linear.stored_weight(), torch.float64).T
    assert got.dtype == torch.bfloat16  # the exact product rounded once to bf16 (half a step: at most 2^-8 of it)
    assert ((got.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-6).all()


@pytest.mark.parametrize("weight_format", ["int8", "bf16"])
@pytest.mark.parametrize("expert_idx", [[[3, 1]], [[3, 1], [0, 3], [1, 2]]])
def test_rows_take_their_routed_experts_in_it(kernel, weight_format, expert_idx):
    torch.manual_seed(0)
    experts = StoredRoutedExperts(RoutedExperts(num_experts=4, hidden_size=64, intermediate_size=32), weight_format)
    gate_up, down = experts.weights()
    expert_idx = torch.tensor(expert_idx)  # one row's two experts in turn; three rows sorted by expert
    row = torch.randn(len(expert_idx), 64)
    with torch.no_grad():
        got = experts(row, expert_idx)
        for m, k in itertools.product(range(len(expert_idx)), range(2)):  # each expert's stored weights, in fp32
            expert = expert_idx[m, k].item()
            picked = ([t[expert] for t in gate_up], [t[expert] for t in down])
            gate, up = F.linear(row[m:m + 1], unpacked(picked[0], torch.float32)).chunk(2, dim=-1)
            want = F.linear(F.silu(gate) * up, unpacked(picked[1], torch.float32))
            torch.testing.assert_close(got[m:m + 1, k], want, rtol=1e-5, atol=1e-5)
            assert (with_torchs_kernel(experts, row, expert_idx)[m:m + 1, k] - want).abs().max() > 10 * (
                got[m:m + 1, k] - want).abs().max()
        # the compiled decode step's form: the eager code as one op in the graph
        torch.testing.assert_close(torch.compile(experts.gathered, fullgraph=True)(row, expert_idx), got)


def load_in_a_child(tmp_path: Path, compiler: str | None) -> subprocess.CompletedProcess:
    """A fresh process with compiler as CC (None: the one found on PATH) and an empty cache: int8 weights on a
    one-row layer."""
    code = ("import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
            "from torch import nn\n"
            "from serving import cpu_gemv\n"
            "from serving.quantize import store_weights\n"
            "layer = store_weights(nn.Sequential(nn.Linear(64, 32, bias=False)), 'int8')\n"
            "print(cpu_gemv.enabled, tuple(layer(torch.randn(1, 64)).shape))\n")
    env = {name: value for name, value in os.environ.items() if name != "CC"} | (
        {"CC": compiler} if compiler else {}) | {"CORTEX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)


def test_it_is_built_once_into_the_cache(kernel, tmp_path):
    compiler = os.environ.get("CC")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cpu_gemv-0123456789abcdef.so").write_bytes(b"an earlier source's build")
    (tmp_path / "cache" / "tokenizer.json").write_text("{}")  # the cache's other files stay
    first = load_in_a_child(tmp_path, compiler)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["True", "(1,", "32)"] and "torch's kernels" not in first.stderr
    built = sorted((tmp_path / "cache").glob("cpu_gemv-*"))
    assert len(built) == 1 and built[0].suffix == ".so" and built[0].read_bytes()[:4] == b"\x7fELF"  # stale one gone
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [built[0].name, "tokenizer.json"]
    before = built[0].stat().st_mtime_ns
    assert load_in_a_child(tmp_path, compiler).stdout == first.stdout
    assert built[0].stat().st_mtime_ns == before  # loaded, not rebuilt


def test_where_it_cannot_be_built_the_format_says_why_and_runs_on_torchs_kernels(tmp_path):
    failing = tmp_path / "broken-cc"
    failing.write_text("#!/bin/sh\necho 'broken-cc: error: unsupported target' >&2\nexit 1\n")
    failing.chmod(0o755)
    for compiler, reason in ((str(failing), "broken-cc: error: unsupported target"),
                             (str(tmp_path / "no-such-cc"), "No such file")):
        child = load_in_a_child(tmp_path, compiler)
        assert child.returncode == 0, child.stderr
        assert child.stdout.split() == ["False", "(1,", "32)"]  # the layer still works
        if cpu_gemv.load() is None:  # where the kernel could run (x86, AVX2): the compiler is what failed
            assert "int8 weights: products of a few rows use torch's kernels" in child.stderr and compiler in child.stderr
            assert reason in child.stderr
        assert not list((tmp_path / "cache").glob("*.so"))  # no half-built library left
