"""model/weights.py: strict loading and saving of .bin (plain torch state dict) and .safetensors."""

import pickle
from pathlib import Path

import pytest
import torch

from model import CortexModel, WeightsMismatchError, load_state_dict_file, load_weights, save_weights, tiny_config

VOCAB = 101


def make_model(seed: int, vocab: int = VOCAB) -> CortexModel:
    torch.manual_seed(seed)
    return CortexModel(tiny_config(vocab))


@pytest.mark.parametrize("name", ["weights.bin", "weights.safetensors"])
def test_save_and_load_round_trip(tmp_path, name):
    source, target = make_model(0), make_model(1)
    path = save_weights(source, tmp_path / name)
    load_weights(target, path)
    for (key, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), key
    assert set(load_state_dict_file(path)) == set(source.state_dict())


def test_published_format_is_a_plain_state_dict_loadable_by_torch(tmp_path):
    path = save_weights(make_model(0), tmp_path / "dpo.bin")
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and len(state) == len(make_model(0).state_dict())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("name", ["weights.bin", "weights.safetensors"])
def test_weights_files_are_memory_mapped_not_read_whole(tmp_path, name):
    # the published dpo.bin holds 2.4 GB of fp32 weights: read whole, loading the server took 5.1 GB instead of 2.9
    weight = torch.randn(64, 64)
    path = save_weights({"w": weight}, tmp_path / name)
    state_dict = load_state_dict_file(path)
    assert str(path) in Path("/proc/self/maps").read_text()  # the tensors are the file's pages
    assert torch.equal(state_dict["w"], weight)
    del state_dict
    assert str(path) not in Path("/proc/self/maps").read_text()  # unmapped with the last tensor
    legacy = tmp_path / "legacy.bin"  # torch's format before 1.6 cannot be mapped: read whole
    torch.save({"w": weight}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict_file(legacy)["w"], weight)


def test_each_expert_weight_is_written_on_its_own(tmp_path):
    # the routed experts' state-dict entries are views of stacked weights: a file holds each one once, by itself
    model = make_model(0)
    key = "layers.1.mlp.experts.2.up_proj.weight"
    one = {key: model.state_dict()[key]}
    assert one[key].untyped_storage().nbytes() > one[key].numel() * 4  # a view of the (experts, ...) stack
    for name in ("one.bin", "one.safetensors"):
        loaded = load_state_dict_file(save_weights(one, tmp_path / name))[key]
        assert torch.equal(loaded, one[key]) and loaded.untyped_storage().nbytes() == loaded.numel() * 4
    assert (tmp_path / "one.bin").stat().st_size < 2 * one[key].numel() * 4


def test_mismatches_are_listed_not_silently_skipped(tmp_path):
    state = make_model(0).state_dict()
    state.pop("layers.1.mlp.gate.weight")
    state["layers.9.extra.weight"] = torch.zeros(3)
    state["lm_head.weight"] = torch.zeros(7, 64)
    target = make_model(1)
    before = target.lm_head.weight.clone()
    with pytest.raises(WeightsMismatchError) as error:
        load_weights(target, state)
    message = str(error.value)
    assert "missing keys (1)" in message and "layers.1.mlp.gate.weight" in message
    assert "unexpected keys (1)" in message and "layers.9.extra.weight" in message
    assert "shape mismatches (1)" in message and "lm_head.weight: file (7, 64) vs model (101, 64)" in message
    assert torch.equal(target.lm_head.weight, before)  # nothing was loaded


def test_a_prefixed_checkpoint_gets_a_hint(tmp_path):
    state = {f"module.{k}": v for k, v in make_model(0).state_dict().items()}
    with pytest.raises(WeightsMismatchError, match="prefix 'module.'"):
        load_weights(make_model(1), state)


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"lm_head.weight": Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_weights(make_model(0), path)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_weights(make_model(0), tmp_path / "missing.bin")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_weights(make_model(0), broken)
    not_a_dict = tmp_path / "list.bin"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="list.bin does not hold a state dict"):
        load_weights(make_model(0), not_a_dict)
