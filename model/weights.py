"""Weights as the published plain torch state dict (`.bin`, e.g. Cortex 2.5.1 `dpo.bin`) or safetensors; loading is
strict, and a mismatch is an error that lists every missing, unexpected or mis-shaped key."""

import pickle
import zipfile
from pathlib import Path

import safetensors.torch
import torch
from torch import nn


class WeightsMismatchError(ValueError):
    pass


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors`, or from a torch file (`.bin`, `.pt`, ...) with weights_only=True. Both are
    memory-mapped (a torch file saved in the zip format torch.save writes since 1.6; an older one is read whole): the
    tensors stay file pages, which the kernel can drop, until copied into a model (read whole, the full model's 2.4 GB
    fp32 .bin took as much process memory again while loading; README, "The full model on a CPU")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except safetensors.SafetensorError as error:
            raise ValueError(f"{path} is not a valid safetensors file ({error}); re-download or re-save it") from error
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"{path} could not be read as a plain tensor state dict with torch.load(weights_only=True): "
                         f"{reason}. Arbitrary pickles are never loaded; the file must hold only tensors "
                         "(torch.save(model.state_dict()) or save_weights), or be a .safetensors file") from error
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in state_dict.items()):
        raise ValueError(f"{path} does not hold a state dict (a dict of name -> tensor) but a {type(state_dict).__name__}")
    return state_dict


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise WeightsMismatchError listing missing keys, unexpected keys and shape mismatches, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{source} does not match the model ({type(model).__name__})"]
    parts += [_listing(title, items) for title, items in
              (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if items]
    prefixes = {k.split(".", 1)[0] for k in unexpected}
    if len(prefixes) == 1 and all(k.split(".", 1)[-1] in expected for k in unexpected):
        parts.append(f"hint: every key carries the prefix '{prefixes.pop()}.'; strip it before loading")
    elif mismatched or missing:
        parts.append("hint: check that the model config (sizes, layers, experts) matches the one the weights were trained with")
    raise WeightsMismatchError("\n".join(parts))


def load_weights(model: nn.Module, source: str | Path | dict[str, torch.Tensor]) -> nn.Module:
    """Strictly load a weights file (or an in-memory state dict) into model; returns the model."""
    state_dict = source if isinstance(source, dict) else load_state_dict_file(source)
    check_state_dict(model, state_dict, source="state dict" if isinstance(source, dict) else str(source))
    model.load_state_dict(state_dict, strict=True)
    return model


def save_weights(model_or_state_dict: nn.Module | dict[str, torch.Tensor], path: str | Path) -> Path:
    """Save a state dict as `.safetensors` (by extension) or as a plain torch file (e.g. `.bin`, the published format)."""
    state_dict = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: _standalone(v) for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its storage (the routed experts' entries are views of stacked weights)."""
    tensor = tensor.detach().cpu()
    owns_storage = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if owns_storage and tensor.is_contiguous() else tensor.clone(memory_format=torch.contiguous_format)
