"""Token files on disk: our memory-mapped .npy format, and the original Cortex .pkl files read by a streaming,
restricted pickle reader.

Our format (written by process_data.py; `np.load(..., mmap_mode="r")`, so a 1 GB shard costs O(1) RAM):

    pretrain stream   name.npy                          1-D token ids, documents concatenated, each ending in </s>
    SFT collection    name.npy + name.offsets.npy       flat token ids + int64 offsets of shape (n+1,):
                                                        item i is tokens[offsets[i]:offsets[i+1]]
    DPO collection    name.chosen.npy   + name.chosen.offsets.npy
                      name.rejected.npy + name.rejected.offsets.npy
    GRPO collection   name.prompt.npy   + name.prompt.offsets.npy      (prompt: chat template of system+user,
                      name.answer.npy   + name.answer.offsets.npy       no <assistant>; answer: the encoded gold answer)

A collection is always addressed by `name.npy`, also when its fields live in per-field files. Token arrays are uint16
when the vocabulary fits (<= 65535 ids, Cortex has 46957), else uint32. Loading checks once per file and process that
every id lies in [0, vocab_size), so a file made for another tokenizer fails at load, not in the embedding.

The original's pickles hold a flat list[int] (pretrain), list[list[int]] (SFT), list[{'chosen','rejected'}] (DPO) or
list[{'prompt','answer'}] (GRPO), written by pickle.dump (protocol 4, Python 3.8+'s default; 1-5 are read). They are
never unpickled: _PickleReader decodes their opcodes a chunk at a time and writes the token ids straight into our
arrays, so memory stays flat whatever the file's size, and it accepts only the opcodes of these structures (a class or
function reference, which is how a pickle runs code, is refused like any other).
"""
from __future__ import annotations

import glob
import os
import pickle
import pickletools
import re
import socket
import sys
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete path.tmp<PID>[.<host>] files that a killed writer of this machine left behind; returns them. Files of
    live processes and of other machines (a data dir on a shared disk) are left alone."""
    host = socket.gethostname()
    pattern = re.compile(re.escape(path.name) + r"\.tmp(\d+)(?:\.(.+))?")
    removed = []
    for candidate in path.parent.glob(glob.escape(path.name) + ".tmp*"):
        match = pattern.fullmatch(candidate.name)
        if match is None or (match[2] is not None and match[2] != host) or _pid_alive(int(match[1])):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _temporary_path(path: Path) -> Path:
    # Written under this name and renamed when complete, so a crash never leaves a truncated file under the real name.
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}.{socket.gethostname()}")


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = _temporary_path(path)
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


class _ArrayWriter:
    """A 1-D array written in pieces, into a .npy file (its header written again with the final length at the end:
    numpy leaves room for the length to grow) or, without a path, into memory."""

    def __init__(self, path: Path | None, dtype: np.dtype):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self._parts: list[np.ndarray] = []
        self._file = None
        if path is not None:
            self._tmp = _temporary_path(path)
            self._file = open(self._tmp, "wb", buffering=1 << 20)
            self._write_header()
            self._data_start = self._file.tell()

    def _write_header(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.count,)}
        np.lib.format.write_array_header_1_0(self._file, header)

    def write(self, array: np.ndarray) -> None:
        if self._file is None:
            self._parts.append(np.array(array, dtype=self.dtype))  # a copy: the caller reuses its buffer
        else:
            self._file.write(np.ascontiguousarray(array, dtype=self.dtype).data)
        self.count += len(array)

    def close(self) -> np.ndarray | None:
        """The array when in memory; a file is completed under its temporary name (commit() renames it)."""
        if self._file is None:
            return np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=self.dtype)
        self._file.seek(0)
        self._write_header()
        if self._file.tell() != self._data_start:
            raise RuntimeError(f"{self.path}: the .npy header changed size when its length was written")
        self._file.close()
        return None

    def commit(self) -> Path:
        os.replace(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------------
# The original's pickles, read as a stream of opcodes

def _opcode(name: str) -> int:
    return getattr(pickle, name)[0]


MARK, STOP, EMPTY_LIST, EMPTY_DICT = _opcode("MARK"), _opcode("STOP"), _opcode("EMPTY_LIST"), _opcode("EMPTY_DICT")
APPEND, APPENDS, SETITEM, SETITEMS = _opcode("APPEND"), _opcode("APPENDS"), _opcode("SETITEM"), _opcode("SETITEMS")
BININT1, BININT2, BININT = _opcode("BININT1"), _opcode("BININT2"), _opcode("BININT")
BINPUT, LONG_BINPUT, MEMOIZE = _opcode("BINPUT"), _opcode("LONG_BINPUT"), _opcode("MEMOIZE")
BINGET, LONG_BINGET = _opcode("BINGET"), _opcode("LONG_BINGET")
SHORT_BINUNICODE, BINUNICODE, BINUNICODE8 = _opcode("SHORT_BINUNICODE"), _opcode("BINUNICODE"), _opcode("BINUNICODE8")
PROTO, FRAME = _opcode("PROTO"), _opcode("FRAME")
GLOBAL, INST, STACK_GLOBAL = _opcode("GLOBAL"), _opcode("INST"), _opcode("STACK_GLOBAL")
# opcodes that call or import code; refused with their own message
RUNS_CODE = {_opcode(name) for name in ("GLOBAL", "INST", "STACK_GLOBAL", "REDUCE", "BUILD", "OBJ", "NEWOBJ",
                                        "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID")}
TEXT_OPCODES = {_opcode(name) for name in ("INT", "LONG", "STRING", "UNICODE", "FLOAT", "LIST", "DICT", "TUPLE",
                                           "GET", "PUT")}  # protocol 0's
STRINGS = {SHORT_BINUNICODE: 1, BINUNICODE: 4, BINUNICODE8: 8}  # opcode -> bytes of its length field
INT_MASK = np.zeros((256, 2), dtype=np.uint8)  # opcode -> masks of its int argument's first two bytes; 0: not an int
INT_MASK[[BININT1, BININT2, BININT]] = (0xFF, 0), (0xFF, 0xFF), (0xFF, 0xFF)
MAX_KEY_BYTES = 1024  # strings are only dict keys ('chosen', 'prompt', ...)

# The length of every opcode this reader accepts with a fixed argument; 1 for the rest, also those it refuses (reading
# stops at them, so what their length would have been never matters).
OPCODE_LENGTH = np.ones(256, dtype=np.int16)
for _code, _length in ((BININT1, 2), (BININT2, 3), (BININT, 5), (BINPUT, 2), (LONG_BINPUT, 5), (BINGET, 2),
                       (LONG_BINGET, 5), (PROTO, 2), (FRAME, 9)):
    OPCODE_LENGTH[_code] = _length
LANE_BYTES = 64  # bytes of each block that _opcode_starts decodes as one lane
MAX_OPCODE_BYTES = 1 + 8 + MAX_KEY_BYTES  # the longest opcode this reader accepts (a BINUNICODE8 dict key)


def _walk(length: np.ndarray, at: np.ndarray, end: np.ndarray,
          stop: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Follows the chains of opcodes from `at`, all at once, each while before its `end` and not on a `stop` mark:
    (the positions walked, concatenated; where each chain stopped)."""
    at = at.copy()
    walked = []
    lanes = np.flatnonzero((at < end) if stop is None else (at < end) & ~stop[at])
    while lanes.size:
        here = at[lanes]
        walked.append(here)
        here = here + length[here]
        at[lanes] = here
        keep = here < end[lanes]
        if stop is not None:
            keep &= ~stop[here]
        lanes = lanes[keep]
    return (np.concatenate(walked) if walked else np.zeros(0, dtype=np.int64)), at


def _opcode_starts(data: np.ndarray) -> tuple[np.ndarray, int]:
    """(where each whole opcode of `data` starts, where the cut-off last one starts or len(data)); data begins with an
    opcode and has 8 bytes of padding past its end (not part of it).

    An opcode's length says where the next begins, so decoding is sequential. Here every 64-byte block is decoded at
    once, each as if an opcode began at its first byte (the guess). The chains of a variable-length code meet within a
    few opcodes, so a block whose true entry (where the previous block's last opcode ends) is not on its guess is walked
    again from there only until it meets the guess; if it leaves the block instead, its exit moved and the next block is
    walked again too (a run of ids 0x4d4d, all bytes 'M', never meets: slower, still exact)."""
    n = len(data) - 8
    if n <= 0:
        return np.zeros(0, dtype=np.int64), 0
    body = data[:n]
    length = OPCODE_LENGTH[body]
    for code, size_bytes in STRINGS.items():
        at = np.flatnonzero(body == code)
        if at.size:
            size = np.zeros(at.size, dtype=np.uint64)
            for k in range(size_bytes):
                size |= data[at + 1 + k].astype(np.uint64) << np.uint64(8 * k)
            # a string longer than a dict key is refused when reached, so its length never matters (and counting it
            # as 1 keeps the chains of the blocks that merely hit its byte inside some argument from jumping far)
            length[at] = np.where(size > MAX_KEY_BYTES, 1, 1 + size_bytes + np.minimum(size, MAX_KEY_BYTES))

    starts = np.arange(0, n, LANE_BYTES)
    ends = np.minimum(starts + LANE_BYTES, n)
    guessed, exits = _walk(length, starts, ends, None)
    on_guess = np.zeros(n + MAX_OPCODE_BYTES, dtype=bool)
    on_guess[guessed] = True
    # the true exits, block after block wherever an entry moved off the guess
    true_exits = exits.copy()
    blocks = np.flatnonzero((exits[:-1] >= ends[1:]) | ~on_guess[exits[:-1]]) + 1
    while blocks.size:
        _, at = _walk(length, true_exits[blocks - 1], ends[blocks], on_guess)
        moved = at >= ends[blocks]  # left its block without meeting the guess: its own exit
        new_exits = np.where(moved, at, exits[blocks])
        changed = blocks[new_exits != true_exits[blocks]]
        true_exits[blocks] = new_exits
        blocks = changed[changed + 1 < len(starts)] + 1
    # each block: its true chain from its entry up to where it meets the guess, then the guess
    entries = np.concatenate([[0], true_exits[:-1]])
    walked, met = _walk(length, entries, ends, on_guess)
    wrong, _ = _walk(length, starts, np.minimum(met, ends), None)
    on_guess[wrong] = False
    on_guess[walked] = True
    positions = np.flatnonzero(on_guess[:n])
    if true_exits[-1] > n:  # the last opcode runs past the end of data
        return positions[:-1], int(positions[-1])
    return positions, n


class _Mark:
    pass


_MARK = _Mark()


class _Field:
    """One output array of token ids (+ offsets for a collection: where each list begins, then the end), written a
    chunk at a time."""

    def __init__(self, index: int, name: str | None, tokens: _ArrayWriter, offsets: _ArrayWriter | None):
        self.index, self.name, self.tokens, self.offsets = index, name, tokens, offsets
        self.lists = 0  # lists begun
        self.count = 0  # token ids read into it
        self.starts: list[int] = []  # where the lists begun in the chunk being read start

    def begin_list(self) -> None:
        self.starts.append(self.count)
        self.lists += 1

    def write(self, tokens: np.ndarray) -> None:
        self.tokens.write(tokens)
        if self.offsets is not None:
            self.offsets.write(np.array(self.starts, dtype=np.int64))
        self.starts = []

    def writers(self) -> list[_ArrayWriter]:
        return [self.tokens] + ([self.offsets] if self.offsets is not None else [])

    def close(self):
        if self.offsets is not None:
            self.offsets.write(np.array([self.count], dtype=np.int64))
        return [w.close() for w in self.writers()]


class _List:
    """A list being read: the top-level one of a collection (field None), or one holding token ids."""
    __slots__ = ("field", "index", "count")

    def __init__(self, field: _Field | None, index: int):
        self.field, self.index, self.count = field, index, 0


class _Dict:
    __slots__ = ("index", "keys")

    def __init__(self, index: int):
        self.index, self.keys = index, set()


class _Ints:
    """Token ids pushed since a MARK (or for one APPEND), already written to `into`."""
    __slots__ = ("into", "count")

    def __init__(self, into: _List, count: int):
        self.into, self.count = into, count


class _Items:
    """`count` complete items of a collection, the first numbered `first`, read at once (_PickleReader._read_items)."""
    __slots__ = ("first", "count")

    def __init__(self, first: int, count: int):
        self.first, self.count = first, count


def _describe(value) -> str:
    return {_Ints: "an int", _List: "a list", _Dict: "a dict", str: "a string", _Items: "items"}.get(type(value),
                                                                                                  "something else")


def _items_pattern(task: str) -> re.Pattern:
    """Runs of whole items as pickle.dump writes them with protocol 4 (the original's), over the bytes of a chunk's
    opcodes other than ints, and only where the next opcode begins another item or ends the batch (so no later opcode
    adds to the last of them). A token list: EMPTY_LIST MEMOIZE, then batches of ids (MARK ... APPENDS), then maybe one
    id APPEND; a DPO or GRPO item: EMPTY_DICT MEMOIZE MARK, two keys (BINGET) each with its list, SETITEMS."""
    def op(*codes):
        return re.escape(bytes(codes))
    token_list = op(EMPTY_LIST, MEMOIZE) + b"(?:" + op(MARK, APPENDS) + b")*" + op(APPEND) + b"?"
    if task == "sft":
        return re.compile(b"(?:" + token_list + b")+(?=[" + op(EMPTY_LIST, APPENDS) + b"])")
    item = op(EMPTY_DICT, MEMOIZE, MARK) + (op(BINGET) + token_list) * 2 + op(SETITEMS)
    return re.compile(b"(?:" + item + b")+(?=[" + op(EMPTY_DICT, APPENDS) + b"])")


_OPCODE_WORDS = {"BINFLOAT": "a float", "NONE": "None", "NEWTRUE": "a bool", "NEWFALSE": "a bool",
                 "EMPTY_TUPLE": "a tuple", "TUPLE1": "a tuple", "TUPLE2": "a tuple", "TUPLE3": "a tuple",
                 "LONG1": "an int beyond 32 bits", "LONG4": "an int beyond 32 bits", "EMPTY_LIST": "a list",
                 "EMPTY_DICT": "a dict", "EMPTY_SET": "a set"}


class _PickleReader:
    """Reads an original token pickle of `task` fed in chunks, writing its token ids into `fields` as they come.

    A small stack machine over the opcodes pickle.dump writes for these structures, one method per opcode. Token ids
    are decoded a chunk at a time (vectorised) and pushed as runs between the other opcodes; the stack holds lists,
    dicts, marks, short strings (dict keys) and counts of ids, never the ids themselves: those go to their list's field
    (written once the chunk is read), and may only be pushed onto the newest list of that field (anything else is
    refused, and refused files are never committed). Runs of whole items as pickle.dump writes them are read at once,
    vectorised, where the methods would accept them (_read_items)."""

    def __init__(self, path: Path, size: int, task: str, vocab_size: int, fields: dict[str | None, _Field]):
        self.path, self.size, self.task, self.vocab_size, self.fields = path, size, task, vocab_size, fields
        self.dtype = token_dtype(vocab_size)
        self.stack: list = []
        self.marks: list[int] = []  # stack indices of the MARKs
        self.memo_keys: dict[int, str] = {}  # memoised strings; other memo entries are never needed
        self.memo_size = 0
        self.top: _List | None = None
        self.dicts = 0
        self.stopped = False
        self.offset = 0  # the file offset of the chunk being read
        self.frame_end = 0  # where the last frame ends: an opcode must begin there
        self._frame_end_checked = True
        self._positions, self._consumed = np.zeros(0, dtype=np.int64), 0  # the opcodes of the chunk being read
        self._carry = b""
        self._items = None if task == "pretrain" else _items_pattern(task)
        self._handlers = {MEMOIZE: self._memoize, BINPUT: self._memoize, LONG_BINPUT: self._memoize, MARK: self._mark,
                          APPENDS: self._add_items, SETITEMS: self._add_items, APPEND: self._add_item,
                          SETITEM: self._add_item, EMPTY_LIST: self._empty_list, EMPTY_DICT: self._empty_dict,
                          BINGET: self._get, LONG_BINGET: self._get, PROTO: self._proto, FRAME: self._frame,
                          STOP: self._stop, **{code: self._string for code in STRINGS}}

    # --- errors ---
    def _error(self, message: str) -> TokenFileError:
        return TokenFileError(f"{self.path}: {message}")

    def _where(self, container) -> str:
        if container is None:
            return "the top level"
        if isinstance(container, _Dict):
            return f"item {container.index}"
        if container.field is None:  # the top-level list of a collection: its next item
            return f"item {self.dicts if self.task in ('dpo', 'grpo') else self.fields[None].lists}"
        if self.task == "pretrain":
            return f"token {container.count}"
        return f"item {container.index}" + (f" field {container.field.name!r}" if container.field.name else "")

    def _expected(self, container) -> str:
        if container is None:
            return "expected a list of " + ("token ids" if self.task == "pretrain" else "items")
        if container.field is None:
            return "expected a list of token ids"
        return "expected a flat list of integer token ids"

    def _bad(self, container, what: str) -> TokenFileError:
        """`what` (an int, a float (BINFLOAT) at byte 9, ...) found where `container` takes none."""
        if isinstance(container, _Dict) or (isinstance(container, _List) and container.field is None
                                            and self.task in ("dpo", "grpo")):
            return self._error(f"{self._where(container)} must be a dict with exactly the keys "
                               f"{COLLECTION_FIELDS[self.task]}, each a list of token ids; got {what}")
        return self._error(f"{self._where(container)}: {self._expected(container)}, got {what}")

    def _dict_error(self, index: int) -> TokenFileError:
        return self._error(f"item {index} must be a dict with exactly the keys {COLLECTION_FIELDS[self.task]}, "
                           f"each a list of token ids")

    def _context(self):
        """The container the next pushed value would most likely go into (for messages)."""
        if self.marks and self.marks[-1] > 0:
            container = self.stack[self.marks[-1] - 1]
        else:
            container = next((v for v in reversed(self.stack) if isinstance(v, (_List, _Dict))), None)
        return container if isinstance(container, (_List, _Dict)) else None

    def _unexpected(self, op: int, at: int) -> TokenFileError:
        if chr(op) not in pickletools.code2op:
            return self._error(f"not a valid token pickle: byte 0x{op:02x} at byte {self.offset + at} is no pickle "
                               f"opcode (a damaged or non-pickle file)")
        name = pickletools.code2op[chr(op)].name
        what = f"{_OPCODE_WORDS[name]} ({name})" if name in _OPCODE_WORDS else f"opcode {name}"
        hint = (" (a protocol 0 text pickle: load it and dump it again with pickle protocol 2 or later)"
                if op in TEXT_OPCODES else "")
        return self._bad(self._context(), f"{what} at byte {self.offset + at}{hint}")

    def _refused(self, op: int, at: int, buf: bytes) -> TokenFileError:
        name = pickletools.code2op[chr(op)].name
        if op in (GLOBAL, INST):  # the module and name follow as two text lines
            lines = buf[at + 1:at + 513].split(b"\n")
            target = ".".join(line.decode("utf-8", "replace") for line in lines[:2]) if len(lines) > 2 else name
        elif op == STACK_GLOBAL and len(self.stack) >= 2 and all(isinstance(v, str) for v in self.stack[-2:]):
            target = ".".join(self.stack[-2:])
        else:
            target = f"opcode {name}"
        return self._error(f"refused to unpickle: it references {target} (at byte {self.offset + at}), which could run "
                           f"code. A token pickle holds only lists, dicts, ints and strings; do not use this file")

    def _check_frame_end(self) -> None:
        """A frame's end must fall between two opcodes (pickle would otherwise read the cut opcode differently);
        checked once the opcodes around it are decoded."""
        end = self.frame_end - self.offset
        self._frame_end_checked = end <= self._consumed
        index = np.searchsorted(self._positions, end)
        if end < self._consumed and (index == len(self._positions) or self._positions[index] != end):
            raise self._error(f"a frame ending at byte {self.frame_end} cuts an opcode in two (a corrupt pickle)")

    # --- reading ---
    def feed(self, data: bytes) -> None:
        buf = self._carry + data
        array = np.frombuffer(buf + bytes(8), dtype=np.uint8)
        positions, consumed = _opcode_starts(array)
        self._carry = buf[consumed:]  # a cut-off opcode: at most a dict key's length
        self._positions, self._consumed = positions, consumed
        if not self._frame_end_checked:
            self._check_frame_end()
        ops = array[positions]
        is_int = INT_MASK[ops, 0] != 0
        at, int_ops = positions[is_int], ops[is_int]
        # BININT1: 1 unsigned byte, BININT2: 2, BININT: 4 signed (little-endian)
        values = array[at + 1].astype(np.int32) | (array[at + 2] & INT_MASK[int_ops, 1]).astype(np.int32) << 8
        four = np.flatnonzero(int_ops == BININT)
        if four.size:
            values[four] |= array[at[four] + 3].astype(np.int32) << 16 | array[at[four] + 4].astype(np.int32) << 24
        bad = np.flatnonzero((values < 0) | (values >= self.vocab_size))
        self._first_bad = int(bad[0]) if bad.size else len(values)  # the reader says in which list it lies
        self._values, self._done = values, 0
        self._run_fields, self._run_lengths = [], []

        others = np.flatnonzero(~is_int)
        ops, positions = ops[others], positions[others]
        ints_before = np.diff(others, prepend=-1) - 1  # token ids pushed right before each other opcode
        done = 0  # opcodes read
        for first, end in [m.span() for m in self._items.finditer(ops.tobytes())] if self._items else []:
            self._read_ops(buf, ops[done:first], positions[done:first], ints_before[done:first])
            done = end if self._read_items(array, ops[first:end], positions[first:end], ints_before[first:end]) \
                else first
        self._read_ops(buf, ops[done:], positions[done:], ints_before[done:])
        if len(values) > self._done:
            self._push_ints(len(values) - self._done)
        self._write_chunk(values.astype(self.dtype))
        self.offset += consumed

    def _read_ops(self, buf: bytes, ops: np.ndarray, positions: np.ndarray, ints_before: np.ndarray) -> None:
        """Opcodes other than ints, each by its method, after the ids pushed before it."""
        for op, at, pushed in zip(ops.tolist(), positions.tolist(), ints_before.tolist()):
            if pushed:
                self._push_ints(pushed)
            self._handlers.get(op, self._step)(op, at, buf)

    def _write_chunk(self, tokens: np.ndarray) -> None:
        """The chunk's token ids, each run into the field of the list it was pushed onto."""
        fields = list(self.fields.values())
        if len(fields) == 1:
            fields[0].write(tokens)
            return
        owner = np.repeat(np.array(self._run_fields, dtype=np.int64), self._run_lengths)
        for field in fields:
            field.write(tokens[owner == field.index])

    def _read_items(self, data: np.ndarray, ops: np.ndarray, positions: np.ndarray, ints_before: np.ndarray) -> bool:
        """Whole items (a run that _items_pattern found) read at once, as the opcode methods would read them; False
        (nothing read) where those must: the run does not begin between items of the top-level list's batch, or an
        item could be refused (ids out of range, misplaced or in the wrong number, keys not the task's)."""
        stack, fields = self.stack, list(self.fields.values())
        items = int((ops == (EMPTY_LIST if self.task == "sft" else EMPTY_DICT)).sum())
        first = fields[0].lists if self.task == "sft" else self.dicts  # the number of the first item
        if (not items or self.stopped or self.marks != [1] or stack[0] is not self.top
                or not isinstance(stack[-1], (_Mark, _Items, _List if self.task == "sft" else _Dict))
                or any(field.lists != first for field in fields)  # item i holds list i of each field
                or (self.memo_keys and max(self.memo_keys) >= self.memo_size)):  # MEMOIZE overwrites no key
            return False
        ints = int(ints_before.sum())
        placed = np.where(ops == APPENDS, True, ints_before == (ops == APPEND))  # ids only where they are appended
        if self._first_bad < self._done + ints or not placed.all():
            return False
        lists = np.flatnonzero(ops == EMPTY_LIST)
        if self.task == "sft":
            list_fields = np.zeros(len(lists), dtype=np.int64)
        else:  # each list's field, from the key memoised before it
            field_of_memo = np.full(256, -1)
            for index, key in self.memo_keys.items():
                if index < 256 and key in self.fields:
                    field_of_memo[index] = self.fields[key].index
            list_fields = field_of_memo[data[positions[ops == BINGET] + 1]]
            if (list_fields < 0).any() or (list_fields[0::2] == list_fields[1::2]).any():
                return False
        appended = np.flatnonzero(ints_before)
        run_lists = np.searchsorted(lists, appended) - 1  # ids go into the list begun last
        run_lengths = ints_before[appended]
        list_tokens = np.bincount(run_lists, weights=run_lengths, minlength=len(lists)).astype(np.int64)
        for field in fields:
            tokens = list_tokens[list_fields == field.index]
            field.starts += (field.count + np.cumsum(tokens) - tokens).tolist()
            field.count += int(tokens.sum())
            field.lists += len(tokens)
        self._run_fields += list_fields[run_lists].tolist()
        self._run_lengths += run_lengths.tolist()
        self._done += ints
        self.memo_size += int((ops == MEMOIZE).sum())
        if self.task != "sft":
            self.dicts += items
        stack.append(_Items(first, items))
        return True

    def finish(self) -> None:
        if not self._frame_end_checked and self.frame_end != self.offset + len(self._carry):
            raise self._error(f"a frame ending at byte {self.frame_end} cuts an opcode in two (a corrupt pickle)")
        if self._carry and self.stopped:
            raise self._error(f"data after the pickle's end at byte {self.offset}: not a token pickle")
        if not self.stopped:
            raise self._error(f"the pickle ends at byte {self.offset + len(self._carry)} before its STOP opcode (the "
                              f"file is cut short: download or make it again)")

    def _push_ints(self, count: int) -> None:
        """The next `count` token ids of the chunk, pushed onto the newest list of a field (and later written to it)."""
        if self.stopped:
            raise self._error(f"data after the pickle's end at byte {self.offset}: not a token pickle")
        stack = self.stack
        top = stack[-1] if stack else None
        if isinstance(top, _Ints):
            into, run = top.into, top
        else:
            into = stack[-2] if top is _MARK and len(stack) > 1 else top
            run = None
        if not isinstance(into, _List) or into.field is None:
            raise self._bad(into if isinstance(into, (_List, _Dict)) else self._context(), "an int")
        if into.index != into.field.lists - 1:
            raise self._error(f"{self._where(into)}: token ids added after the next list began: not a token pickle "
                              f"as pickle.dump writes it")
        start, self._done = self._done, self._done + count
        if self._first_bad < self._done:
            token = into.count + self._first_bad - start
            where = f"token {token}" if self.task == "pretrain" else f"{self._where(into)} token {token}"
            raise self._error(f"{where}: token ids must lie in [0, {self.vocab_size}), got "
                              f"{self._values[self._first_bad]} (made for another tokenizer? process_data.py convert "
                              f"--vocab-size sets the vocabulary)")
        into.count += count
        into.field.count += count
        self._run_fields.append(into.field.index)
        self._run_lengths.append(count)
        if run is None:
            stack.append(_Ints(into, count))
        else:
            run.count += count

    # --- one method per accepted opcode: (op, at: its offset in buf, buf) ---
    def _step(self, op: int, at: int, buf: bytes) -> None:
        """Any opcode without a method of its own: refused."""
        if self.stopped:
            raise self._error(f"data after the pickle's end at byte {self.offset + at}: not a token pickle")
        if op in RUNS_CODE:
            raise self._refused(op, at, buf)
        raise self._unexpected(op, at)

    def _memoize(self, op: int, at: int, buf: bytes) -> None:
        stack = self.stack
        if not stack or stack[-1] is _MARK:
            raise self._error(f"byte {self.offset + at}: a corrupt pickle (memoising an empty stack)")
        if op == MEMOIZE:
            index, self.memo_size = self.memo_size, self.memo_size + 1
        else:
            index = int.from_bytes(buf[at + 1:at + (2 if op == BINPUT else 5)], "little")
        if type(stack[-1]) is str:
            self.memo_keys[index] = stack[-1]
        elif self.memo_keys:
            self.memo_keys.pop(index, None)

    def _mark(self, op: int, at: int, buf: bytes) -> None:
        self.marks.append(len(self.stack))
        self.stack.append(_MARK)

    def _add_items(self, op: int, at: int, buf: bytes) -> None:
        """APPENDS, SETITEMS: the items after the last MARK into the object before it."""
        if not self.marks:
            raise self._error(f"byte {self.offset + at}: a corrupt pickle (APPENDS or SETITEMS without a MARK)")
        stack, mark = self.stack, self.marks.pop()
        items = stack[mark + 1:]
        del stack[mark:]
        target = stack[-1] if stack else None
        self._append(target, items, at) if op == APPENDS else self._set_items(target, items, at)

    def _add_item(self, op: int, at: int, buf: bytes) -> None:
        """APPEND, SETITEM: one item (one key and value)."""
        stack, size = self.stack, 2 if op == APPEND else 3
        if len(stack) < size or any(v is _MARK for v in stack[-size + 1:]):
            raise self._error(f"byte {self.offset + at}: a corrupt pickle (APPEND or SETITEM without its values)")
        items = stack[-size + 1:]
        if isinstance(items[-1], _Ints) and items[-1].count > 1:  # the stack holds several ids: APPEND takes one
            raise self._error(f"byte {self.offset + at}: a corrupt pickle (APPEND onto an int)")
        del stack[-size + 1:]
        self._append(stack[-1], items, at) if op == APPEND else self._set_items(stack[-1], items, at)

    def _empty_list(self, op: int, at: int, buf: bytes) -> None:
        self.stack.append(self._new_list(at))

    def _empty_dict(self, op: int, at: int, buf: bytes) -> None:
        if self.task not in ("dpo", "grpo") or self.top is None:
            raise self._unexpected(op, at)
        self.stack.append(_Dict(self.dicts))
        self.dicts += 1

    def _string(self, op: int, at: int, buf: bytes) -> None:
        size_bytes = STRINGS[op]
        size = int.from_bytes(buf[at + 1:at + 1 + size_bytes], "little")
        if size > MAX_KEY_BYTES:
            raise self._error(f"a string of {size} bytes at byte {self.offset + at}: a token pickle holds no text but "
                              f"dict keys")
        try:
            self.stack.append(sys.intern(buf[at + 1 + size_bytes:at + 1 + size_bytes + size].decode("utf-8")))
        except UnicodeDecodeError as e:
            raise self._error(f"byte {self.offset + at}: a corrupt pickle (a string that is not UTF-8)") from e

    def _get(self, op: int, at: int, buf: bytes) -> None:
        index = int.from_bytes(buf[at + 1:at + (2 if op == BINGET else 5)], "little")
        if index not in self.memo_keys:
            raise self._error(f"{self._where(self._context())}: a second reference to an earlier list or dict "
                              f"(memo {index}, byte {self.offset + at}); each list of a token pickle is its own")
        self.stack.append(self.memo_keys[index])

    def _proto(self, op: int, at: int, buf: bytes) -> None:
        if self.offset + at != 0 or buf[at + 1] > 5:
            raise self._error(f"byte {self.offset + at}: PROTO {buf[at + 1]} (pickle protocols 1-5 are read, and "
                              f"PROTO only as the first opcode)")

    def _frame(self, op: int, at: int, buf: bytes) -> None:
        """Frames only group whole opcodes for buffered reading."""
        if self.offset + at < self.frame_end:
            raise self._error(f"byte {self.offset + at}: a corrupt pickle (a frame begins inside another)")
        self.frame_end = self.offset + at + 9 + int.from_bytes(buf[at + 1:at + 9], "little")
        if self.frame_end > self.size:
            raise self._error(f"a frame at byte {self.offset + at} runs past the end of the file (it is cut short: "
                              f"download or make it again)")
        self._check_frame_end()

    def _stop(self, op: int, at: int, buf: bytes) -> None:
        if self.top is None or self.stack != [self.top] or self.marks:
            raise self._error(f"the pickle ends (STOP at byte {self.offset + at}) with unfinished items: "
                              f"{self._expected(None)}")
        self.stopped = True
        self._handlers = {}  # anything after STOP is refused

    def _new_list(self, at: int) -> _List:
        if self.top is None:  # the top-level list
            if self.stack:
                raise self._unexpected(EMPTY_LIST, at)
            self.top = _List(self.fields[None] if self.task == "pretrain" else None, 0)
            if self.top.field is not None:
                self.top.field.begin_list()
            return self.top
        if self.task == "pretrain":
            raise self._unexpected(EMPTY_LIST, at)
        if self.task == "sft":
            field = self.fields[None]
        else:  # a dict's value: its key was pushed just before
            key = self.stack[-1]
            if not isinstance(key, str):
                raise self._unexpected(EMPTY_LIST, at)
            if key not in self.fields:
                raise self._dict_error(self.dicts - 1)
            field = self.fields[key]
        new = _List(field, field.lists)
        field.begin_list()
        return new

    def _append(self, target, items: list, at: int) -> None:
        if not isinstance(target, _List):
            raise self._bad(target if isinstance(target, _Dict) else None, f"a list item (APPEND) at byte "
                                                                           f"{self.offset + at}")
        for item in items:
            if target.field is not None:  # a list of token ids (already written)
                if not (isinstance(item, _Ints) and item.into is target):
                    raise self._bad(target, _describe(item))
            elif isinstance(item, _Items) and item.first == target.count:
                target.count += item.count
            elif self.task == "sft":
                if not (isinstance(item, _List) and item.field is not None and item.index == target.count):
                    raise self._bad(target, _describe(item))
                target.count += 1
            else:
                if not (isinstance(item, _Dict) and item.index == target.count):
                    raise self._bad(target, _describe(item))
                if len(item.keys) != len(self.fields):
                    raise self._dict_error(item.index)
                target.count += 1

    def _set_items(self, target, items: list, at: int) -> None:
        if not isinstance(target, _Dict):
            context = target if isinstance(target, _List) else None
            raise self._bad(context, f"a dict item (SETITEM) at byte {self.offset + at}")
        if len(items) % 2:
            raise self._dict_error(target.index)
        for key, value in zip(items[::2], items[1::2]):
            if not (isinstance(key, str) and key in self.fields and key not in target.keys and isinstance(value, _List)
                    and value.field is self.fields[key] and value.index == target.index):
                raise self._dict_error(target.index)
            target.keys.add(key)


PICKLE_READ_BYTES = 1 << 20  # per chunk: a few times this in numpy arrays is the reader's peak memory


def _read_pickle(path: str | Path, task: str, vocab_size: int, out: Path | None) -> dict[str | None, list]:
    """{field: [tokens, offsets]} of the original pickle at `path`: in memory, or (with `out`) written as our files
    (the values are then None, see _ArrayWriter.close) and committed only when the whole file was read."""
    path = Path(path)
    if not path.exists():
        raise TokenFileError(f"{path}: file not found")
    dtype = token_dtype(vocab_size)
    names = (None,) if task == "pretrain" else collection_fields(task)
    fields: dict[str | None, _Field] = {}
    try:
        for name in names:
            if out is None:
                tokens_path = offsets_path = None
            else:
                tokens_path, offsets_path = (out, None) if task == "pretrain" else collection_paths(out, name)
            fields[name] = _Field(len(fields), name, _ArrayWriter(tokens_path, dtype),
                                  None if task == "pretrain" else _ArrayWriter(offsets_path, np.dtype(np.int64)))
        with open(path, "rb") as f:
            reader = _PickleReader(path, os.fstat(f.fileno()).st_size, task, vocab_size, fields)
            while chunk := f.read(PICKLE_READ_BYTES):
                reader.feed(chunk)
        reader.finish()
        arrays = {name: field.close() for name, field in fields.items()}
    except BaseException:
        for field in fields.values():
            for writer in field.writers():
                writer.discard()
        raise
    if out is not None:
        for field in fields.values():
            for writer in field.writers():
                writer.commit()
    return arrays


def convert_pickle(path: str | Path, task: str, vocab_size: int, out: str | Path) -> list[Path]:
    """An original .pkl of `task` ("pretrain", "sft", "dpo", "grpo") written in our format as `out` (name.npy);
    returns the files written. Read that way from then on, the tokens are memory-mapped (2 bytes each, shared by every
    process through the page cache) instead of unpickled into Python ints (about 36 bytes each) by every process that
    reads the file. Memory stays flat whatever the file's size (PICKLE_READ_BYTES at a time)."""
    out = Path(out)
    if out.suffix != ".npy":
        raise TokenFileError(f"{out}: token files are written as name.npy")
    _read_pickle(path, task, vocab_size, out)
    if task == "pretrain":
        return [out]
    return [p for name in collection_fields(task) for p in collection_paths(out, name)]


# ----------------------------------------------------------------------------------------------------------------------
# Loading

def _check_integer_array(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise TokenFileError(f"{what}: expected a 1-D integer array, got shape {array.shape} dtype {array.dtype}")
    return array


def _remake_hint(address: Path, task: str) -> str:
    """How to make the token files addressed by `address` (name.npy) again."""
    if address.name.endswith(".pkl.npy"):  # FileDataset's conversion of name.pkl
        pkl = address.with_suffix("")
        return (f"delete {pkl.name}.converted.json beside it and the next run converts {pkl.name} again (downloading it "
                f"if it is gone), or run: python3 process_data.py convert {pkl} --task {task} --out {address}")
    return (f"make it again with process_data.py (for an original .pkl: python3 process_data.py convert NAME.pkl "
            f"--task {task} --out {address})")


def _load_npy(path: Path, remake: str) -> np.ndarray:
    remove_stale_temporaries(path)
    if not path.exists():
        raise TokenFileError(f"{path}: file not found (make token files with process_data.py)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as e:  # a cut-off or damaged file; object arrays need pickle, which we never allow
        raise TokenFileError(f"{path}: not a plain numeric .npy file, or a damaged one ({e}); {remake}") from e
    return _check_integer_array(array, str(path))


_CHECKED_RANGE: set[tuple] = set()  # token files (path, size, mtime, inode, vocab_size) this process already checked
RANGE_CHECK_TOKENS = 1 << 24  # per chunk of the memory map


def _check_token_range(tokens: np.ndarray, path: Path, vocab_size: int, remake: str,
                       offsets: np.ndarray | None = None) -> None:
    """Every id in [0, vocab_size): else the embedding fails steps later with a bare IndexError. Once per file and
    process (a pass over the memory map, about a second per GB)."""
    if tokens.dtype.kind == "u" and np.iinfo(tokens.dtype).max < vocab_size:
        return
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, vocab_size)
    if key in _CHECKED_RANGE:
        return
    for start in range(0, len(tokens), RANGE_CHECK_TOKENS):
        chunk = tokens[start:start + RANGE_CHECK_TOKENS]
        if chunk.min() < 0 or chunk.max() >= vocab_size:
            bad = start + int(np.flatnonzero((chunk < 0) | (chunk >= vocab_size))[0])
            if offsets is None:
                where = f"token {bad}"
            else:
                item = int(np.searchsorted(offsets, bad, side="right")) - 1
                where = f"item {item} (its token {bad - int(offsets[item])})"
            raise TokenFileError(f"{path}: {where} is id {tokens[bad]}, outside [0, {vocab_size}) of this model's "
                                 f"vocabulary: the file was made for another tokenizer, or is damaged; {remake}")
    _CHECKED_RANGE.add(key)


def load_stream(path: str | Path, vocab_size: int) -> np.ndarray:
    """The flat pretrain token stream of a .npy (memory-mapped) or original .pkl file."""
    path = Path(path)
    if path.suffix == ".npy":
        offsets_path = collection_paths(path, None)[1]
        if offsets_path.exists():
            raise TokenFileError(f"{path} is an SFT collection ({offsets_path.name} lies beside it), not a pretrain "
                                 f"token stream")
        remake = _remake_hint(path, "pretrain")
        tokens = _load_npy(path, remake)
        _check_token_range(tokens, path, vocab_size, remake)
        return tokens
    if path.suffix == ".pkl":
        return _read_pickle(path, "pretrain", vocab_size, None)[None][0]
    raise TokenFileError(f"{path}: unknown token file type (expected .npy or .pkl)")


def load_collection(path: str | Path, kind: str, vocab_size: int) -> dict[str | None, RaggedTokens]:
    """The fields of a ragged collection ("sft", "dpo", "grpo") from our .npy files or an original .pkl file."""
    path = Path(path)
    fields = collection_fields(kind)
    if path.suffix == ".npy":
        out = {field: _load_ragged_npy(path, field, kind, vocab_size) for field in fields}
    elif path.suffix == ".pkl":
        out = {field: RaggedTokens(*arrays) for field, arrays in _read_pickle(path, kind, vocab_size, None).items()}
    else:
        raise TokenFileError(f"{path}: unknown token file type (expected .npy or .pkl)")
    if len({len(r) for r in out.values()}) != 1:
        raise TokenFileError(f"{path}: the fields {fields} hold different numbers of items")
    return out


def _load_ragged_npy(path: Path, field: str | None, kind: str, vocab_size: int) -> RaggedTokens:
    tokens_path, offsets_path = collection_paths(path, field)
    remake = _remake_hint(path, kind)
    tokens = _load_npy(tokens_path, remake)
    offsets = np.asarray(_load_npy(offsets_path, remake), dtype=np.int64)
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
        raise TokenFileError(f"{offsets_path}: offsets must start at 0, never decrease and end at len({tokens_path.name})"
                             f"; {remake}")
    _check_token_range(tokens, tokens_path, vocab_size, remake, offsets)
    return RaggedTokens(tokens, offsets)
