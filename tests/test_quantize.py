"""serving/quantize.py and the serving formats: bf16 and int8 stored weights, --dtype/--quantize, the per-machine default."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import app as app_module
from model import generate
from model.mlp import MLP
from model.moe import RoutedExperts
from serving.quantize import (StoredLinear, StoredMLP, StoredRoutedExperts, quantize_per_channel, store_weights,
                              unpacked)
from serving.checkpoint import (DTYPES, CheckpointError, cpu_features, default_format, load_for_serving,
                                pick_format, prefill_dtype)
from serving.engine import Engine, Finished, GenerationRequest, SamplingParams

from test_app_server import model, single_torch_thread, tokenizer, write_run_dir  # noqa: F401  (fixtures: the autouse one, tokenizer, model)


def test_per_channel_int8_round_trips_each_row_within_half_a_step():
    weight = torch.randn(2, 6, 10) * torch.tensor([1e-3, 1.0, 50.0, 1.0, 1.0, 0.0])[:, None]  # rows of any scale
    weight_int8, scales = quantize_per_channel(weight)
    assert weight_int8.dtype == torch.int8 and scales.shape == (2, 6)
    assert weight_int8.abs().amax(dim=-1)[:, :5].eq(127).all()  # each row's largest weight uses the full range
    error = (weight_int8.float() * scales[..., None] - weight).abs()
    assert (error <= scales[..., None] / 2 + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_model_logits_stay_close_to_fp32(model, dtype):
    quantized = store_weights(copy.deepcopy(model), "int8").to(dtype)
    kinds = {type(m) for m in quantized.modules()}
    assert {StoredLinear, StoredMLP, StoredRoutedExperts} <= kinds
    assert not kinds & {nn.Linear, MLP, RoutedExperts, type(model.lm_head)}
    kernel_scales = [b for n, b in quantized.named_buffers() if n.endswith("kernel_scales")]
    assert kernel_scales and all(b.dtype == torch.bfloat16 for b in kernel_scales)  # the kernel's dtype, cast once
    assert not any(key.endswith("kernel_scales") for key in quantized.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(ids)["logits"], quantized(ids)["logits"].float()
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # int8 weights (and the kernel's bf16 activations): errors of a few percent of the logits' range at most
    assert (got - expected).abs().max() < 0.04 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    with torch.no_grad():  # the head's target log-probs (eval.py's held-out loss) come from the int8 weights too
        expected, got = model(ids, targets=ids)["target_log_probs"], quantized(ids, targets=ids)["target_log_probs"]
    assert got.shape == expected.shape and (got - expected).abs().max() < 0.05 * expected.abs().max()


def bf16_rounded(model: nn.Module) -> nn.Module:
    """A copy whose linear, expert and head weights are rounded to bf16 and kept in the model's dtype."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, (nn.Linear, RoutedExperts, type(model.lm_head))):
                for param in module.parameters(recurse=False):
                    param.copy_(param.bfloat16())
    return rounded


def test_bf16_weights_stay_bf16_and_prompts_multiply_in_the_model_dtype(model):
    stored = store_weights(copy.deepcopy(model), "bf16").to(torch.float32)
    weights = [b for n, b in stored.named_buffers() if n.endswith("_bf16")]
    assert len(weights) == len([m for m in stored.modules() if isinstance(m, StoredLinear)]) + 2 * len(
        [m for m in stored.modules() if isinstance(m, (StoredMLP, StoredRoutedExperts))])  # gate_up, down
    assert all(w.dtype == torch.bfloat16 for w in weights)  # through .to(float32): half the bytes, cast once
    assert stored.lm_head.weight_bf16.equal(model.lm_head.weight.bfloat16())
    reference = bf16_rounded(model)
    ids = torch.randint(0, model.config.vocab_size, (4, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 400 rows (~200 per expert): the prompt path, fp32 products with the bf16 weights cast up
        expected, got = reference(ids)["logits"], stored(ids)["logits"]
        assert got.dtype == torch.float32 and torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
        expected, got = reference(ids, targets=ids)["target_log_probs"], stored(ids, targets=ids)["target_log_probs"]
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
        # a few rows (decoding): bf16 activations in the products, fp32 everywhere else
        expected, got = reference(ids[:1, :8])["logits"], stored(ids[:1, :8])["logits"]
    assert got.dtype == torch.float32 and not torch.equal(got, expected)  # the bf16 kernel ran
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.85


@pytest.mark.parametrize("weight_format", ["int8", "bf16"])
def test_a_single_row_takes_its_experts_directly_and_gets_the_sorted_batch_result(weight_format):
    torch.manual_seed(0)
    experts = RoutedExperts(num_experts=4, hidden_size=16, intermediate_size=8)
    stored = StoredRoutedExperts(experts, weight_format)
    rows, expert_idx = torch.randn(3, 16), torch.tensor([[2, 0], [0, 1], [3, 2]])
    with torch.no_grad():
        batch, expected = stored(rows, expert_idx), experts(rows, expert_idx)
        for row in range(3):  # one row: its K experts in turn, no sort; the same numbers as inside the sorted batch
            torch.testing.assert_close(stored(rows[row:row + 1], expert_idx[row:row + 1]), batch[row:row + 1])
    assert batch.shape == expected.shape == (3, 2, 16)
    assert (batch - expected).abs().max() < 0.03 * expected.abs().max()  # gate and up in one stored weight


@pytest.mark.parametrize("weight_format", ["int8", "bf16"])
def test_layers_of_any_width_get_their_stored_weights_product(weight_format):
    # the kernels step through a row 16 (torch's AVX-512 int8) or 32 (cpu_gemv.c) columns at a time: other widths
    # take another path (torch's int8 kernel returned garbage or crashed on a Zen 4 CPU at 8 or 24 columns)
    torch.manual_seed(0)
    for hidden_size, intermediate_size in ((8, 24), (48, 8), (64, 16), (64, 32)):
        mlp = StoredMLP(MLP(hidden_size, intermediate_size), weight_format)
        for rows in (1, 2, 5, 40):  # one row, a few (the kernels), a prompt (the dequantized weights)
            x = torch.randn(rows, hidden_size)
            with torch.no_grad():
                gate, up = F.linear(x, unpacked(mlp.stored_weight("gate_up_proj_"), torch.float32)).chunk(2, dim=-1)
                want = F.linear(F.silu(gate) * up, unpacked(mlp.stored_weight("down_proj_"), torch.float32))
                got = mlp(x)
            assert got.dtype == torch.float32  # bf16 activations in torch's kernels: within bf16's rounding
            torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())


@pytest.mark.parametrize("weight_format", ["int8", "bf16"])
def test_prompts_multiply_in_the_prefill_dtype_and_decoding_rows_do_not(weight_format):
    # where bf16 matmuls are native the server prefills in bf16 (half fp32's time on a Zen 4); a few rows keep the
    # kernels' own dtypes, and the output keeps the input's
    torch.manual_seed(0)
    linear, mlp = nn.Linear(64, 48, bias=False), MLP(64, 32)
    experts = RoutedExperts(num_experts=4, hidden_size=64, intermediate_size=16)
    modules = nn.ModuleList([linear, mlp, experts])
    # through store_weights: it loads cpu_gemv.c, whose products of a few rows take fp32 activations
    stored = store_weights(copy.deepcopy(modules), weight_format, torch.bfloat16)
    plain = store_weights(modules, weight_format)
    # 200 rows: ~100 an expert, beyond the 32 the few-row kernels take
    rows, expert_idx = torch.randn(200, 64), torch.randint(0, 4, (200, 2), generator=torch.Generator().manual_seed(1))

    def weight(module, prefix=""):
        return unpacked(module.stored_weight(prefix), torch.bfloat16)

    def mlp_in_bf16(x, module, expert=None):
        gate_up, down = weight(module, "gate_up_proj_"), weight(module, "down_proj_")
        if expert is not None:
            gate_up, down = gate_up[expert], down[expert]
        gate, up = F.linear(x.bfloat16(), gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, down).float()

    with torch.no_grad():
        got = [stored[0](rows), stored[1](rows), stored[2](rows, expert_idx)]
        assert all(out.dtype == torch.float32 for out in got)
        assert torch.equal(got[0], F.linear(rows.bfloat16(), weight(stored[0])).float())
        assert torch.equal(got[1], mlp_in_bf16(rows, stored[1]))
        # the routed experts: only the products differ from the fp32 prefill (the sort and each expert's rows don't)
        expected = plain[2](rows, expert_idx)
        assert not torch.equal(got[2], expected) and (got[2] - expected).abs().max() < 0.02 * expected.abs().max()
        row, expert = 7, int(expert_idx[7, 1])
        assert (got[2][row, 1] - mlp_in_bf16(rows[row:row + 1], stored[2], expert)[0]).abs().max() < 1e-6
        for few in (1, 5):  # decoding: the same numbers as without a prefill dtype
            assert torch.equal(stored[0](rows[:few]), plain[0](rows[:few]))
            assert torch.equal(stored[1](rows[:few]), plain[1](rows[:few]))
            assert torch.equal(stored[2](rows[:few], expert_idx[:few]), plain[2](rows[:few], expert_idx[:few]))


def test_the_server_prefills_in_bf16_only_where_bf16_is_native(tmp_path, model):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert prefill_dtype(cpu, torch.float32, native_bf16=True) == torch.bfloat16
    assert prefill_dtype(cpu, torch.float32, native_bf16=False) is None  # emulated bf16 GEMMs: 5-9x fp32's time
    assert prefill_dtype(cpu, torch.bfloat16, native_bf16=True) is None  # already the model's dtype
    assert prefill_dtype(cuda, torch.float32, native_bf16=True) is None
    served = load_for_serving(write_run_dir(tmp_path / "run", model), device="cpu", dtype="float32", quantize="bf16")
    stored = [m for m in served.model.modules() if isinstance(m, (StoredLinear, StoredMLP, StoredRoutedExperts))]
    native = cpu_features()[1]
    assert served.model.lm_head.prefill_dtype is None  # logits stay fp32 (prompt log-probs score whole prompts)
    assert {m.prefill_dtype for m in stored if m is not served.model.lm_head} == {
        torch.bfloat16 if native else None}
    ids = torch.randint(0, model.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the whole model: logits in fp32, close to the fp32 prefill's
        got = served.model(ids)["logits"]
        for module in stored:
            module.prefill_dtype = None
        expected = served.model(ids)["logits"]
    assert got.dtype == torch.float32 and torch.equal(got, expected) != native
    assert (got - expected).abs().max() < 0.03 * expected.abs().max()


@pytest.mark.parametrize("dtype, quantize", [("float32", "none"), ("bfloat16", "none"), ("float32", "bf16"),
                                             ("float32", "int8"), ("bfloat16", "int8")])
def test_the_server_loads_part_by_part_what_the_whole_model_converted_gives(tmp_path, model, dtype, quantize):
    # load_for_serving reads, converts and casts one decoder layer (or the embedding, or the head) at a time, so it
    # never holds the whole model in fp32: the same tensors as converting the whole loaded model
    served = load_for_serving(write_run_dir(tmp_path / "run", model), device="cpu", dtype=dtype, quantize=quantize)
    expected = copy.deepcopy(model)
    if quantize != "none":
        prefill = prefill_dtype(torch.device("cpu"), DTYPES[dtype], cpu_features()[1])
        expected = store_weights(expected, quantize, prefill)
    expected = expected.to(DTYPES[dtype])
    got_tensors = dict(served.model.named_buffers()) | dict(served.model.named_parameters())
    want_tensors = dict(expected.named_buffers()) | dict(expected.named_parameters())
    assert got_tensors.keys() == want_tensors.keys()
    for name, want in want_tensors.items():
        assert got_tensors[name].dtype == want.dtype and torch.equal(got_tensors[name], want), name
    assert [type(m) for m in served.model.modules()] == [type(m) for m in expected.modules()]
    assert not served.model.training


@pytest.mark.parametrize("weight_format", ["int8", "bf16"])
def test_generate_runs_a_model_with_stored_weights(model, tokenizer, weight_format):
    converted = store_weights(copy.deepcopy(model), weight_format)
    prompt = [5, 9, 30, 41]
    got = generate(converted, prompt, max_new_tokens=10, stop_token_ids=[tokenizer.eos_id])
    assert got == greedy_without_cache(converted, prompt, 10, tokenizer.eos_id)
    # the compiled step (the server's --compile): experts picked by index in the graph, the same tokens
    assert generate(converted, prompt, max_new_tokens=10, stop_token_ids=[tokenizer.eos_id], compile=True) == got


def greedy_without_cache(model, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """The whole sequence through the model for each token: no KV cache, no batching."""
    tokens = []
    with torch.no_grad():
        while len(tokens) < max_new_tokens and eos_id not in tokens:
            tokens.append(int(model(torch.tensor([prompt + tokens]))["logits"][0, -1].argmax()))
    return tokens


def test_greedy_decoding_of_an_int8_checkpoint_through_the_engine(tmp_path, model, tokenizer):
    served = load_for_serving(write_run_dir(tmp_path / "run", model), device="cpu", dtype="float32", quantize="int8")
    assert isinstance(served.model.lm_head, StoredLinear) and served.model.lm_head.weight_format == "int8"
    engine = Engine(served.model, served.tokenizer, slots=2, seed=0).start()
    try:
        prompts = [[5, 9, 30, 41], [100, 7], list(range(50, 70))]
        requests = [engine.submit(GenerationRequest(p, SamplingParams(temperature=0.0, max_new_tokens=12),
                                                    thinking=False)) for p in prompts]
        for prompt, request in zip(prompts, requests):
            tokens = []
            while not isinstance(event := request.events.get(timeout=30), Finished):
                tokens.append(event.token_id)
            assert tokens == greedy_without_cache(served.model, prompt, 12, tokenizer.eos_id)
    finally:
        engine.stop()


def test_bad_format_flags_get_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        app_module.main(["--quantize", "int4"])
    assert "--quantize: invalid choice: 'int4' (choose from" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="--quantize 'int4' is not one of none, bf16, int8"):
        pick_format(None, "int4", torch.device("cpu"))
    with pytest.raises(CheckpointError, match="--dtype 'fp8' is not one of"):
        pick_format("fp8", None, torch.device("cpu"))
    assert pick_format("bfloat16", "none", torch.device("cpu")) == (torch.bfloat16, "none")
    assert pick_format("float32", None, torch.device("cpu")) == (torch.float32, "none")  # a --dtype alone: as it says


def test_default_format_follows_the_cpu():
    cpu = torch.device("cpu")
    # x86, with native bf16 (AVX512-BF16, AMX) or not: fp32 compute, bf16 weights (cpu_gemv.c for one row)
    assert default_format(cpu, "AVX2") == default_format(cpu, "AVX512") == ("float32", "bf16")
    assert default_format(cpu, "DEFAULT") == ("float32", "none")
    assert default_format(torch.device("mps"), "DEFAULT") == ("float32", "none")
