"""The streaming reader of the original's pickles (trainer/token_files.py) against the real pickle module, and the
faults of token files on disk: ids out of range, damaged .npy files, temporaries of killed writers."""
import os
import pickle
import pickletools
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

import trainer.token_files as token_files
from trainer.token_files import (COLLECTION_FIELDS, TokenFileError, collection_paths, convert_pickle, load_collection,
                                 load_stream, remove_stale_temporaries, save_stream)

VOCAB = 46957
ORIGINAL_PROTOCOL = 4  # pickle.dump's default from Python 3.8 to 3.13, what the original's process_data.py wrote with


def _dump(path, obj, protocol=ORIGINAL_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def _original_format(kind, rng):
    """A small pickle's content in each original format; ids chosen so that every int opcode (1, 2, 4 bytes) occurs and
    that argument bytes look like opcodes (0x4d4d = 'MM', 0x8c8c: SHORT_BINUNICODE, 0x5858 = 'XX')."""
    def seq(n):
        ids = rng.integers(0, VOCAB, n)
        ids[::7] = rng.choice([0, 2, 255, 256, 0x4D4D, 0x8C8C, 0x5858, VOCAB - 1], size=len(ids[::7]))
        return ids.tolist()
    if kind == "pretrain":
        return seq(3001)
    if kind == "sft":
        return [seq(int(rng.integers(0, 1200))) for _ in range(12)] + [[], [5]]
    fields = ("chosen", "rejected") if kind == "dpo" else ("prompt", "answer")
    return [{field: seq(int(rng.integers(1, 40))) for field in fields} for _ in range(40)]


def _items(fields, kind):
    return {field: [r[i].tolist() for i in range(len(r))] for field, r in fields.items()}


def _expected(obj, kind):
    if kind == "sft":
        return {None: obj}
    return {field: [item[field] for item in obj] for field in obj[0]}


@pytest.mark.parametrize("protocol", [ORIGINAL_PROTOCOL, 2, 5])
@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo", "grpo"])
def test_conversion_matches_pickle_load_item_by_item(tmp_path, monkeypatch, kind, protocol):
    # tiny chunks and lanes: opcodes cut at chunk ends and blocks entered mid-opcode everywhere
    monkeypatch.setattr(token_files, "PICKLE_READ_BYTES", 997)
    monkeypatch.setattr(token_files, "LANE_BYTES", 16)
    obj = _original_format(kind, np.random.default_rng(protocol))
    pkl = _dump(tmp_path / f"{kind}.pkl", obj, protocol)
    assert pickle.loads(pkl.read_bytes()) == obj
    out = tmp_path / f"{kind}.pkl.npy"
    written = convert_pickle(pkl, kind, VOCAB, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([pkl.name] + [p.name for p in written])
    if kind == "pretrain":
        assert written == [out]
        assert load_stream(out, VOCAB).tolist() == load_stream(pkl, VOCAB).tolist() == obj
        assert np.load(out).dtype == np.uint16
    else:
        assert _items(load_collection(out, kind, VOCAB), kind) == _items(load_collection(pkl, kind, VOCAB), kind) \
            == _expected(obj, kind)


@pytest.mark.parametrize("read_bytes", [1 << 14, 1 << 20])
def test_batches_of_1000_and_single_appends_match_pickle_load(tmp_path, monkeypatch, read_bytes):
    """pickle.dump appends 1000 items per MARK ... APPENDS and a last single one with APPEND, to the top-level list and
    to each token list; items written in either key order (runs of whole items are read at once)."""
    monkeypatch.setattr(token_files, "PICKLE_READ_BYTES", read_bytes)
    rng = np.random.default_rng(1)
    sft = [rng.integers(0, VOCAB, n).tolist() for n in [1001, 2000, 0, 1, 2, 5] * 167]  # 1002 items
    pkl = _dump(tmp_path / "sft.pkl", sft)
    convert_pickle(pkl, "sft", VOCAB, tmp_path / "sft.npy")
    assert _items(load_collection(tmp_path / "sft.npy", "sft", VOCAB), "sft") == {None: sft}
    grpo = [{"prompt": rng.integers(0, VOCAB, 1001 if i % 100 == 0 else 30).tolist(),
             "answer": rng.integers(0, VOCAB, i % 3).tolist()} for i in range(1001)]
    grpo = [item if i % 2 else dict(reversed(item.items())) for i, item in enumerate(grpo)]
    pkl = _dump(tmp_path / "grpo.pkl", grpo)
    convert_pickle(pkl, "grpo", VOCAB, tmp_path / "grpo.npy")
    assert _items(load_collection(tmp_path / "grpo.npy", "grpo", VOCAB), "grpo") == _expected(grpo, "grpo")


def test_damaged_pickles_are_refused_or_read_as_pickle_reads_them(tmp_path, monkeypatch):
    """Small pickles with bytes overwritten and opcodes or ids inserted: what the reader accepts, pickle.loads reads the
    same."""
    rng = np.random.default_rng(7)
    bytes_to_try = [ord(c) for c in "e a ] } ( h u".split()] + [0x94]
    accepted = 0
    for trial in range(300):
        kind = ("sft", "dpo", "grpo")[trial % 3]
        monkeypatch.setattr(token_files, "PICKLE_READ_BYTES", int(rng.choice([50, 1 << 20])))
        if kind == "sft":
            obj = [rng.integers(0, VOCAB, rng.integers(0, 5)).tolist() for _ in range(rng.integers(1, 20))]
        else:
            obj = [{field: rng.integers(0, VOCAB, rng.integers(0, 4)).tolist() for field in COLLECTION_FIELDS[kind]}
                   for _ in range(rng.integers(1, 20))]
        data = bytearray(pickle.dumps(obj, protocol=ORIGINAL_PROTOCOL))
        for at in sorted(rng.integers(11, len(data), rng.integers(1, 3)), reverse=True):  # after PROTO and FRAME
            if rng.random() < 0.5:
                data[at] = int(rng.choice(bytes_to_try)) if rng.random() < 0.7 else int(rng.integers(0, 256))
            else:  # an id or an opcode inserted
                data[at:at] = pickle.BININT1 + bytes([rng.integers(0, 256)]) if rng.random() < 0.5 else \
                    bytes([rng.choice(bytes_to_try)])
        data[3:11] = (len(data) - 11).to_bytes(8, "little")  # the one frame still holds the whole pickle
        (tmp_path / "x.pkl").write_bytes(data)
        try:
            read = load_collection(tmp_path / "x.pkl", kind, VOCAB)
        except TokenFileError:
            continue
        accepted += 1
        loaded = pickle.loads(data)
        assert _items(read, kind) == {field: [item if field is None else item[field] for item in loaded]
                                      for field in COLLECTION_FIELDS[kind]}
    assert accepted > 30  # ids changed, items moved between batches: still token pickles


def test_ids_beyond_uint16_convert_to_uint32(tmp_path):
    pkl = _dump(tmp_path / "big.pkl", [[70000, 1], [65536]])
    convert_pickle(pkl, "sft", 80000, tmp_path / "big.npy")
    fields = load_collection(tmp_path / "big.npy", "sft", 80000)
    assert fields[None].tokens.dtype == np.uint32 and _items(fields, "sft") == {None: [[70000, 1], [65536]]}


def test_memory_stays_flat_whatever_the_file_size(tmp_path, monkeypatch):
    monkeypatch.setattr(token_files, "PICKLE_READ_BYTES", 1 << 16)
    ids = np.random.default_rng(0).integers(0, VOCAB, 1_000_000)
    pkl = _dump(tmp_path / "pretrain_short_0.pkl", ids.tolist())  # 3 MB; unpickled: ~36 MB of Python ints
    tracemalloc.start()
    try:
        convert_pickle(pkl, "pretrain", VOCAB, tmp_path / "out.npy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MB for 64 KB chunks"
    assert np.array_equal(np.load(tmp_path / "out.npy"), ids)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [ORIGINAL_PROTOCOL, 2])
def test_pickles_that_would_run_code_are_refused_and_nothing_is_written(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = [{"chosen": [1, 2], "rejected": _RunsCode(marker)}]
    pkl = _dump(tmp_path / "dpo.pkl", evil, protocol)
    with pytest.raises(TokenFileError, match=r"dpo\.pkl: refused to unpickle: it references (posix|os)\.system .*"
                                             r"which could run code"):
        convert_pickle(pkl, "dpo", VOCAB, tmp_path / "dpo.pkl.npy")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dpo.pkl"]  # no output, no temporaries


@pytest.mark.parametrize("obj, kind, message", [
    ([1, True, 3], "pretrain", r"token 1: expected a flat list of integer token ids, got a bool \(NEWTRUE\)"),
    ([1, [2]], "pretrain", r"token 1: expected a flat list of integer token ids, got a list"),
    ([[1, 2], 3], "sft", r"item 1: expected a list of token ids, got an int"),
    ([[1, 2], (3,)], "sft", r"item 1: expected a list of token ids, got a tuple"),
    ([{"prompt": [1], "answer": [2], "x": [3]}], "grpo", r"item 0 must be a dict with exactly the keys"),
    ([{"prompt": [1], "answer": 2}], "grpo", r"item 0 must be a dict with exactly the keys"),
    ([1, 2 ** 40], "pretrain", r"an int beyond 32 bits \(LONG1\)"),
    ([5, -1], "pretrain", r"token 1: token ids must lie in \[0, 46957\), got -1"),
    ([[1], [2, 3, 46957]], "sft", r"item 1 token 2: token ids must lie in \[0, 46957\), got 46957"),
])
def test_pickles_that_are_not_token_files_name_the_item(tmp_path, obj, kind, message):
    pkl = _dump(tmp_path / "x.pkl", obj)
    with pytest.raises(TokenFileError, match=message):
        convert_pickle(pkl, kind, VOCAB, tmp_path / "x.npy")


def test_shared_lists_cut_files_and_trailing_data_are_refused(tmp_path):
    shared = [7, 8]
    pkl = _dump(tmp_path / "shared.pkl", [shared, shared])  # the second is a memo reference to the first
    with pytest.raises(TokenFileError, match=r"item 1: a second reference to an earlier list"):
        load_collection(pkl, "sft", VOCAB)
    data = pickle.dumps(list(range(5000)), protocol=ORIGINAL_PROTOCOL)
    (tmp_path / "cut.pkl").write_bytes(data[:-100])
    with pytest.raises(TokenFileError, match=r"cut\.pkl: .*cut short"):
        load_stream(tmp_path / "cut.pkl", VOCAB)
    (tmp_path / "cut2.pkl").write_bytes(pickle.dumps(list(range(50)), protocol=2)[:-1])
    with pytest.raises(TokenFileError, match=r"cut2\.pkl: the pickle ends at byte \d+ before its STOP opcode"):
        load_stream(tmp_path / "cut2.pkl", VOCAB)
    int_opcode = next(at for op, _, at in pickletools.genops(data) if op.name == "BININT2")
    cut_frame = bytearray(data)  # the first frame made to end inside an opcode
    cut_frame[3:11] = (int_opcode + 1 - 11).to_bytes(8, "little")
    (tmp_path / "frame.pkl").write_bytes(cut_frame)
    with pytest.raises(TokenFileError, match=r"frame\.pkl: a frame ending at byte \d+ cuts an opcode in two"):
        load_stream(tmp_path / "frame.pkl", VOCAB)
    (tmp_path / "trailing.pkl").write_bytes(data + b"K\x01")
    with pytest.raises(TokenFileError, match=r"trailing\.pkl: data after the pickle's end"):
        load_stream(tmp_path / "trailing.pkl", VOCAB)
    (tmp_path / "text.pkl").write_bytes(pickle.dumps([1, 2], protocol=0))
    with pytest.raises(TokenFileError, match=r"protocol 0 text pickle"):
        load_stream(tmp_path / "text.pkl", VOCAB)


# ----------------------------------------------------------------------------------------------------------------------
# Faults of token files on disk

def test_npy_ids_out_of_range_are_refused_at_load_naming_file_and_item(tmp_path):
    stream = tmp_path / "pretrain.npy"
    np.save(stream, np.array([1, 2, 50000, 3], dtype=np.uint16))  # made for a larger vocabulary
    with pytest.raises(TokenFileError, match=r"pretrain\.npy: token 2 is id 50000, outside \[0, 46957\) of this "
                                             r"model's vocabulary"):
        load_stream(stream, VOCAB)
    assert load_stream(stream, 65535).tolist() == [1, 2, 50000, 3]  # a vocabulary it fits

    tokens, offsets = collection_paths(tmp_path / "dpo.npy", "rejected")
    for field in ("chosen", "rejected"):
        t, o = collection_paths(tmp_path / "dpo.npy", field)
        np.save(t, np.array([1, 2, 3, 4], dtype=np.int8))
        np.save(o, np.array([0, 1, 4], dtype=np.int64))
    np.save(tokens, np.array([1, 2, -3, 4], dtype=np.int8))  # negative ids
    with pytest.raises(TokenFileError, match=r"dpo\.rejected\.npy: item 1 \(its token 1\) is id -3"):
        load_collection(tmp_path / "dpo.npy", "dpo", VOCAB)

    # checked once per file and process; a different file under the same name is checked again
    good = np.array([1, 2, 3], dtype=np.uint16)
    np.save(stream, good)
    assert load_stream(stream, VOCAB).tolist() == [1, 2, 3]
    time.sleep(0.01)
    np.save(stream, np.array([1, 46957], dtype=np.uint16))
    with pytest.raises(TokenFileError, match=r"token 1 is id 46957"):
        load_stream(stream, VOCAB)


def test_a_damaged_converted_file_says_how_to_convert_it_again(tmp_path):
    pkl = _dump(tmp_path / "cot_sft.pkl", [[1, 2, 3], [4]])
    out = tmp_path / "cot_sft.pkl.npy"
    convert_pickle(pkl, "sft", VOCAB, out)
    out.write_bytes(out.read_bytes()[:-3])  # cut short
    with pytest.raises(TokenFileError, match=r"cot_sft\.pkl\.npy: not a plain numeric \.npy file, or a damaged one .*"
                                             r"delete cot_sft\.pkl\.converted\.json beside it and the next run converts "
                                             r"cot_sft\.pkl again .* python3 process_data.py convert .*cot_sft\.pkl "
                                             r"--task sft --out .*cot_sft\.pkl\.npy"):
        load_collection(out, "sft", VOCAB)
    (tmp_path / "own.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(TokenFileError, match=r"own\.npy: not a plain numeric \.npy file, or a damaged one .*make it "
                                             r"again with process_data.py"):
        load_stream(tmp_path / "own.npy", VOCAB)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "pre.npy"
    dead, host = _dead_pid(), socket.gethostname()
    stale = [tmp_path / f"pre.npy.tmp{dead}", tmp_path / f"pre.npy.tmp{dead}.{host}"]
    kept = [tmp_path / f"pre.npy.tmp{os.getppid()}.{host}",  # a live writer's
            tmp_path / f"pre.npy.tmp{dead}.another-machine"]  # its PID means nothing here
    for path in stale + kept:
        path.write_bytes(b"partial")
    save_stream(out, [1, 2], VOCAB)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name] + [p.name for p in kept])
    stale[0].write_bytes(b"partial")
    load_stream(out, VOCAB)  # loading cleans too
    assert not stale[0].exists()
    assert remove_stale_temporaries(out) == []


def test_a_conversion_killed_midway_leaves_nothing_that_lasts(tmp_path):
    """kill -9 during a conversion: no file under the real name, and the next conversion removes the temporary."""
    fifo, out = tmp_path / "pretrain.pkl", tmp_path / "pretrain.pkl.npy"
    os.mkfifo(fifo)  # the converter blocks reading it, half-way through the pickle
    data = pickle.dumps(list(range(40000)), protocol=2)  # no frames: a pipe has no size to check them against
    code = ("import sys; from trainer.token_files import convert_pickle; "
            "convert_pickle(sys.argv[1], 'pretrain', 46957, sys.argv[2])")
    child = subprocess.Popen([sys.executable, "-c", code, str(fifo), str(out)],
                             env=dict(os.environ, PYTHONPATH=os.getcwd()))
    with open(fifo, "wb") as pipe:
        pipe.write(data[:len(data) // 2])
        pipe.flush()
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("pretrain.pkl.npy.tmp*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert [p.name for p in tmp_path.glob("pretrain.pkl.npy.tmp*")] == [f"pretrain.pkl.npy.tmp{child.pid}."
                                                                        f"{socket.gethostname()}"]
    assert not out.exists()
    fifo.unlink()
    _dump(fifo, list(range(40000)))
    convert_pickle(fifo, "pretrain", VOCAB, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain.pkl", "pretrain.pkl.npy"]
    assert load_stream(out, VOCAB).tolist() == list(range(40000))
