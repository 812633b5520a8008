"""Token files on disk: our memory-mapped .npy format, and the original Cortex .pkl files through a restricted unpickler.

Our format (written by process_data.py; `np.load(..., mmap_mode="r")`, so a 1 GB shard costs O(1) RAM):

    pretrain stream   name.npy                          1-D token ids, documents concatenated, each ending in </s>
    SFT collection    name.npy + name.offsets.npy       flat token ids + int64 offsets of shape (n+1,):
                                                        item i is tokens[offsets[i]:offsets[i+1]]
    DPO collection    name.chosen.npy   + name.chosen.offsets.npy
                      name.rejected.npy + name.rejected.offsets.npy
    GRPO collection   name.prompt.npy   + name.prompt.offsets.npy      (prompt: chat template of system+user,
                      name.answer.npy   + name.answer.offsets.npy       no <assistant>; answer: the encoded gold answer)

A collection is always addressed by `name.npy`, also when its fields live in per-field files. Token arrays are uint16
when the vocabulary fits (<= 65535 ids, Cortex has 46957), else uint32.

The original's pickles hold a flat list[int] (pretrain), list[list[int]] (SFT), list[{'chosen','rejected'}] (DPO) or
list[{'prompt','answer'}] (GRPO). They load into the same in-memory structures (a one-off RAM cost), through an
unpickler that refuses every global, so a pickle cannot run code.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from trainer.errors import DataError

# Fields of each ragged collection kind; None means the field-less SFT naming (name.npy + name.offsets.npy).
COLLECTION_FIELDS: dict[str, tuple[str | None, ...]] = {
    "sft": (None,),
    "dpo": ("chosen", "rejected"),
    "grpo": ("prompt", "answer"),
}


class TokenFileError(DataError):
    """A token file is missing, malformed, or not safe to load."""


def collection_fields(kind: str) -> tuple[str | None, ...]:
    if kind not in COLLECTION_FIELDS:
        raise ValueError(f"unknown collection kind {kind!r} (expected one of {', '.join(COLLECTION_FIELDS)})")
    return COLLECTION_FIELDS[kind]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


@dataclass
class RaggedTokens:
    """Variable-length token sequences stored flat: item i is tokens[offsets[i]:offsets[i+1]]."""
    tokens: np.ndarray   # 1-D integer array (often a read-only memmap)
    offsets: np.ndarray  # 1-D int64, offsets[0] == 0, non-decreasing, offsets[-1] == len(tokens)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_sequences(cls, seqs: Sequence[Sequence[int]], dtype: np.dtype) -> "RaggedTokens":
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        tokens = np.concatenate([np.asarray(s, dtype=dtype) for s in seqs]) if seqs else np.zeros(0, dtype=dtype)
        return cls(tokens, offsets)


# ----------------------------------------------------------------------------------------------------------------------
# Paths and writing

def collection_paths(path: str | Path, field: str | None) -> tuple[Path, Path]:
    """(tokens file, offsets file) of one field of the collection addressed by `path` (name.npy)."""
    path = Path(path)
    if path.suffix != ".npy":
        raise TokenFileError(f"{path}: a token collection is addressed by its name.npy path")
    stem = path.with_suffix("")
    base = stem if field is None else stem.with_name(f"{stem.name}.{field}")
    return base.with_name(base.name + ".npy"), base.with_name(base.name + ".offsets.npy")


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    # Write to a temporary name and rename, so a crash never leaves a truncated file under the real name.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _checked_tokens(tokens: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise TokenFileError(f"{what}: token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    return tokens.astype(token_dtype(vocab_size), copy=False)


def save_stream(path: str | Path, tokens: Sequence[int] | np.ndarray, vocab_size: int) -> Path:
    path = Path(path)
    if path.suffix != ".npy":
        raise TokenFileError(f"{path}: a token stream is written as name.npy")
    tokens = _check_integer_array(np.asarray(tokens), str(path)) if len(tokens) else np.zeros(0, dtype=np.int64)
    _save_npy_atomic(path, _checked_tokens(tokens, vocab_size, str(path)))
    return path


def save_collection(path: str | Path, kind: str,
                    fields: dict[str | None, RaggedTokens | Sequence[Sequence[int]]], vocab_size: int) -> list[Path]:
    """Write a ragged collection of `kind` ("sft", "dpo", "grpo"); returns the files written."""
    if set(fields) != set(collection_fields(kind)):
        raise TokenFileError(f"{kind} collection needs fields {COLLECTION_FIELDS[kind]}, got {tuple(fields)}")
    if len({len(seqs) for seqs in fields.values()}) != 1:
        raise TokenFileError(f"{path}: all fields of a {kind} collection need the same number of items")
    written = []
    for field, seqs in fields.items():
        tokens_path, offsets_path = collection_paths(path, field)
        ragged = seqs if isinstance(seqs, RaggedTokens) else RaggedTokens.from_sequences(seqs, np.dtype(np.int64))
        _save_npy_atomic(tokens_path, _checked_tokens(ragged.tokens, vocab_size, str(tokens_path)))
        _save_npy_atomic(offsets_path, ragged.offsets)
        written += [tokens_path, offsets_path]
    return written


def convert_pickle(path: str | Path, task: str, vocab_size: int, out: str | Path) -> list[Path]:
    """An original .pkl of `task` ("pretrain", "sft", "dpo", "grpo"), loaded through the restricted unpickler, written
    in our format as `out` (name.npy); returns the files written. Read that way from then on, the tokens are
    memory-mapped (2 bytes each, shared by every process through the page cache) instead of unpickled into Python ints
    (about 36 bytes each) by every process that reads the file."""
    if task == "pretrain":
        return [save_stream(out, load_stream(path, vocab_size), vocab_size)]
    return save_collection(out, task, load_collection(path, task, vocab_size), vocab_size)


# ----------------------------------------------------------------------------------------------------------------------
# Loading

class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _RefuseGlobalsUnpickler(pickle.Unpickler):
    """Builds only what pickle opcodes make without imports (lists, dicts, ints, strings, ...); any class or function
    reference, which is how a pickle runs code (__reduce__ -> os.system), is refused."""

    def find_class(self, module: str, name: str):
        raise _RefusedGlobal(f"{module}.{name}")


def restricted_pickle_load(path: str | Path):
    """Unpickle a token file without ever importing anything; the structure is validated by the caller."""
    path = Path(path)
    if not path.exists():
        raise TokenFileError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return _RefuseGlobalsUnpickler(f).load()
    except _RefusedGlobal as e:
        raise TokenFileError(f"{path}: refused to unpickle: it references {e}, which could run code. A token pickle "
                             f"holds only lists, dicts, ints and strings; do not use this file") from e
    except Exception as e:  # any other failure means a corrupt or non-pickle file
        raise TokenFileError(f"{path}: not a valid token pickle ({type(e).__name__}: {e})") from e


def _int_array(value, what: str) -> np.ndarray:
    """A list of Python ints as an int64 array; anything else (floats, strings, nested lists, None) is refused."""
    if not isinstance(value, list):
        raise TokenFileError(f"{what}: expected a list of token ids, got {type(value).__name__}")
    if not value:
        return np.zeros(0, dtype=np.int64)
    array = np.asarray(value)  # dtype follows the content: only all-int lists come out as an integer dtype
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise TokenFileError(f"{what}: expected a flat list of integer token ids")
    return array.astype(np.int64, copy=False)


def _check_integer_array(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise TokenFileError(f"{what}: expected a 1-D integer array, got shape {array.shape} dtype {array.dtype}")
    return array


def _load_npy(path: Path) -> np.ndarray:
    if not path.exists():
        raise TokenFileError(f"{path}: file not found (make token files with process_data.py)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # object arrays need pickle, which we never allow
        raise TokenFileError(f"{path}: not a plain numeric .npy file ({e})") from e


def load_stream(path: str | Path, vocab_size: int) -> np.ndarray:
    """The flat pretrain token stream of a .npy (memory-mapped) or original .pkl file."""
    path = Path(path)
    if path.suffix == ".npy":
        offsets_path = collection_paths(path, None)[1]
        if offsets_path.exists():
            raise TokenFileError(f"{path} is an SFT collection ({offsets_path.name} lies beside it), not a pretrain "
                                 f"token stream")
        return _check_integer_array(_load_npy(path), str(path))
    if path.suffix == ".pkl":
        return _checked_tokens(_int_array(restricted_pickle_load(path), str(path)), vocab_size, str(path))
    raise TokenFileError(f"{path}: unknown token file type (expected .npy or .pkl)")


def load_collection(path: str | Path, kind: str, vocab_size: int) -> dict[str | None, RaggedTokens]:
    """The fields of a ragged collection ("sft", "dpo", "grpo") from our .npy files or an original .pkl file."""
    path = Path(path)
    fields = collection_fields(kind)
    if path.suffix == ".npy":
        out = {field: _load_ragged_npy(path, field) for field in fields}
    elif path.suffix == ".pkl":
        out = _collection_from_pickle(restricted_pickle_load(path), fields, vocab_size, str(path))
    else:
        raise TokenFileError(f"{path}: unknown token file type (expected .npy or .pkl)")
    if len({len(r) for r in out.values()}) != 1:
        raise TokenFileError(f"{path}: the fields {fields} hold different numbers of items")
    return out


def _load_ragged_npy(path: Path, field: str | None) -> RaggedTokens:
    tokens_path, offsets_path = collection_paths(path, field)
    tokens = _check_integer_array(_load_npy(tokens_path), str(tokens_path))
    offsets = np.asarray(_check_integer_array(_load_npy(offsets_path), str(offsets_path)), dtype=np.int64)
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
        raise TokenFileError(f"{offsets_path}: offsets must start at 0, never decrease and end at len({tokens_path.name})")
    return RaggedTokens(tokens, offsets)


def _collection_from_pickle(items, fields: tuple[str | None, ...], vocab_size: int, what: str):
    if not isinstance(items, list):
        raise TokenFileError(f"{what}: expected a list of items, got {type(items).__name__}")
    if fields == (None,):
        per_field = {None: items}
    else:
        for i, item in enumerate(items):
            if not isinstance(item, dict) or set(item) != set(fields):
                raise TokenFileError(f"{what}: item {i} must be a dict with exactly the keys {fields}")
        per_field = {field: [item[field] for item in items] for field in fields}
    out = {}
    for field, seqs in per_field.items():
        arrays = [_int_array(s, f"{what}: item {i}" + (f" field {field!r}" if field else "")) for i, s in enumerate(seqs)]
        ragged = RaggedTokens.from_sequences(arrays, np.dtype(np.int64))
        out[field] = RaggedTokens(_checked_tokens(ragged.tokens, vocab_size, what), ragged.offsets)
    return out
