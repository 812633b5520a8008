"""FileDataset downloads through the real modelscope client, pointed (MODELSCOPE_ENDPOINT) at a local fake hub that
speaks the ModelScope dataset protocol (dependencies.md section 4)."""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from file_dataset import MODELSCOPE_DATASET, STAGE_FILES, DataFileError, FileDataset, download_file

REPO_ROOT = Path(__file__).resolve().parents[1]


class FakeHub:
    """Files served as dataset MODELSCOPE_DATASET. `listed_sha256` overrides the sha256 the listing announces and
    `missing` names files that are listed but answer 404 (both to exercise failures). Downloads honour HTTP Range
    (`ranges` logs each file request's Range header) and can be slowed (`chunk_delay_s` between 256 KB pieces)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.listed_sha256: dict[str, str] = {}
        self.missing: set[str] = set()
        self.requests: list[str] = []
        self.ranges: list[tuple[str, str | None]] = []
        self.download_delay_s = 0.0
        self.chunk_delay_s = 0.0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append(self.path)
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                prefix = f"/api/v1/datasets/{MODELSCOPE_DATASET}/repo"
                if url.path == prefix + "/tree":
                    listing = [{"Path": name, "Name": name, "Type": "blob", "Size": len(data),
                                "Sha256": hub.listed_sha256.get(name, hashlib.sha256(data).hexdigest())}
                               for name, data in hub.files.items()]
                    self._send(200, json.dumps({"Code": 200, "Success": True,
                                                "Data": {"Files": listing, "TotalCount": len(listing)}}).encode())
                elif url.path == prefix and query.get("FilePath") in hub.files:
                    name = query["FilePath"]
                    if name in hub.missing:
                        self._send(404, json.dumps({"Code": 404, "Message": f"{name} not found"}).encode())
                        return
                    time.sleep(hub.download_delay_s)
                    data, byte_range = hub.files[name], self.headers.get("Range")
                    hub.ranges.append((name, byte_range))
                    if byte_range is None:
                        self._send(200, data, "application/octet-stream")
                        return
                    start, _, end = byte_range.removeprefix("bytes=").partition("-")
                    start, end = int(start), int(end) if end else len(data) - 1
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self._send(206, data[start:end + 1], "application/octet-stream",
                               {"Content-Range": f"bytes {start}-{end}/{len(data)}"})
                else:  # e.g. /api/v1/repos/internalAccelerationInfo
                    self._send(404, json.dumps({"Code": 404, "Message": "not found"}).encode())

            def _send(self, status, body, content_type="application/json", headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                piece = 256 * 1024 if hub.chunk_delay_s else len(body) or 1
                try:
                    for start in range(0, len(body), piece):
                        self.wfile.write(body[start:start + piece])
                        time.sleep(hub.chunk_delay_s)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed mid-download
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def file_requests(self) -> list[str]:
        return [parse_qs(urlparse(p).query)["FilePath"][0] for p in self.requests if "FilePath=" in p]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    files = {"cot_sft.pkl": b"cot-bytes" * 100, "mix_sft.pkl": b"mix-bytes" * 100, "grpo.pkl": b"grpo" * 10}
    fake = FakeHub(files)
    fake.thread.start()
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", fake.url)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms_cache"))
    monkeypatch.setenv("MODELSCOPE_API_MAX_RETRIES", "1")
    monkeypatch.setenv("MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def data_dir_entries(data_dir):
    return sorted(p.name for p in data_dir.iterdir())


def test_stage_file_lists():
    assert STAGE_FILES["pretrain_stage0"] == [f"pretrain_short_{i}.pkl" for i in range(8)]
    assert STAGE_FILES["pretrain_stage1"] == ["pretrain_long_0.pkl", "pretrain_long_1.pkl"]
    assert [STAGE_FILES[s] for s in ("cot", "grpo", "mix", "dpo")] == [["cot_sft.pkl"], ["grpo.pkl"], ["mix_sft.pkl"],
                                                                       ["dpo.pkl"]]
    assert len(FileDataset.for_stage("pretrain_stage0")) == 8
    with pytest.raises(ValueError, match="no ModelScope file list for stage 'nope'"):
        FileDataset.for_stage("nope")


def test_download_then_prefetch_next_file(hub, tmp_path):
    data_dir = tmp_path / "data"
    files = FileDataset(["cot_sft.pkl", "mix_sft.pkl"], data_dir=data_dir)
    path = files[0]
    assert path == data_dir / "cot_sft.pkl"
    assert path.read_bytes() == hub.files["cot_sft.pkl"]
    files._join_prefetch()  # the next file was fetched in the background while file 0 was in use
    assert (data_dir / "mix_sft.pkl").read_bytes() == hub.files["mix_sft.pkl"]
    assert hub.file_requests() == ["cot_sft.pkl", "mix_sft.pkl"]
    assert files[1] == data_dir / "mix_sft.pkl"
    assert hub.file_requests() == ["cot_sft.pkl", "mix_sft.pkl"]  # already there: not downloaded again
    assert data_dir_entries(data_dir) == ["cot_sft.pkl", "mix_sft.pkl"]  # no temporary leftovers
    assert files[0].exists()  # delete_consumed is off by default


def test_foreground_waits_for_running_prefetch_and_delete_consumed(hub, tmp_path):
    hub.download_delay_s = 0.3
    data_dir = tmp_path / "data"
    files = FileDataset(["cot_sft.pkl", "mix_sft.pkl", "grpo.pkl"], data_dir=data_dir, delete_consumed=True)
    files[0]
    assert files[1].read_bytes() == hub.files["mix_sft.pkl"]  # joined the prefetch, no second download
    assert (data_dir / "cot_sft.pkl").exists()  # file 0 stays: it holds the held-out split
    files[2]
    assert hub.file_requests() == ["cot_sft.pkl", "mix_sft.pkl", "grpo.pkl"]
    assert data_dir_entries(data_dir) == ["cot_sft.pkl", "grpo.pkl"]  # the consumed file 1 is deleted
    assert files.fetch(0) == data_dir / "cot_sft.pkl" and hub.file_requests()[-1] == "grpo.pkl"


def test_existing_local_file_is_used_without_network(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any download would fail
    (tmp_path / "dpo.pkl").write_bytes(b"local")
    assert FileDataset(["dpo.pkl"], data_dir=tmp_path)[0].read_bytes() == b"local"


def test_unknown_file_is_a_clear_error(hub, tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(DataFileError, match="nope.pkl is not a file of ModelScope dataset") as err:
        FileDataset(["nope.pkl"], data_dir=data_dir, prefetch=False)[0]
    assert str((data_dir / "nope.pkl").resolve()) in str(err.value)
    assert data_dir_entries(data_dir) == []


def test_http_404_is_a_clear_error_and_leaves_nothing(hub, tmp_path):
    hub.missing.add("grpo.pkl")
    data_dir = tmp_path / "data"
    with pytest.raises(DataFileError, match="could not download grpo.pkl") as err:
        download_file("grpo.pkl", data_dir)
    assert err.value.__cause__ is not None  # modelscope's own error is kept as the cause
    assert str((data_dir / "grpo.pkl").resolve()) in str(err.value)
    assert data_dir_entries(data_dir) == []


def test_wrong_sha256_is_a_clear_error_and_leaves_no_partial_file(hub, tmp_path, monkeypatch):
    import modelscope_hub._download
    monkeypatch.setattr(modelscope_hub._download, "DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.01)  # its retries sleep 1 s, 2 s
    hub.listed_sha256["grpo.pkl"] = "0" * 64
    data_dir = tmp_path / "data"
    with pytest.raises(DataFileError, match="could not download grpo.pkl(.|\n)*Hash mismatch"):
        FileDataset(["grpo.pkl"], data_dir=data_dir)[0]
    assert "grpo.pkl" in hub.file_requests()  # the bytes came and were rejected
    assert data_dir_entries(data_dir) == []


def test_offline_is_a_clear_error_naming_the_file_and_where_to_put_it(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    data_dir = tmp_path / "data"
    with pytest.raises(DataFileError, match="could not download cot_sft.pkl") as err:
        FileDataset.for_stage("cot", data_dir=data_dir)[0]
    assert f"Put the file at {(data_dir / 'cot_sft.pkl').resolve()}" in str(err.value)
    assert data_dir_entries(data_dir) == []


def test_failed_prefetch_is_retried_and_reported_when_the_file_is_needed(hub, tmp_path):
    hub.missing.add("mix_sft.pkl")
    files = FileDataset(["cot_sft.pkl", "mix_sft.pkl"], data_dir=tmp_path)
    files[0]
    with pytest.raises(DataFileError, match="could not download mix_sft.pkl"):
        files[1]
    assert hub.file_requests() == ["cot_sft.pkl", "mix_sft.pkl", "mix_sft.pkl"]


def test_killed_download_is_resumed_with_a_range_request(hub, tmp_path):
    big = os.urandom(4 * 1024 * 1024)
    hub.files["big.pkl"] = big
    hub.chunk_delay_s = 0.1  # 16 pieces of 256 KB: 1.6 s
    data_dir = tmp_path / "data"
    partial = data_dir / ".download-big.pkl" / "big.pkl.incomplete"
    code = f"from file_dataset import download_file; download_file('big.pkl', {str(data_dir)!r})"
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    deadline = time.time() + 120
    while not (partial.exists() and partial.stat().st_size >= 1024 * 1024):
        assert child.poll() is None and time.time() < deadline, "the download ended before it could be killed"
        time.sleep(0.01)
    child.kill()
    child.wait()
    received = partial.stat().st_size
    assert 0 < received < len(big)

    hub.chunk_delay_s = 0.0
    assert FileDataset(["big.pkl"], data_dir=data_dir)[0].read_bytes() == big
    assert hub.ranges == [("big.pkl", None), ("big.pkl", f"bytes={received}-")]  # only the missing bytes came again
    assert data_dir_entries(data_dir) == ["big.pkl"]


def test_stale_download_leftovers_are_removed_and_a_partial_of_other_bytes_is_replaced(hub, tmp_path, monkeypatch):
    import modelscope_hub._download
    monkeypatch.setattr(modelscope_hub._download, "DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.01)
    data_dir = tmp_path / "data"
    leftovers = [(".download-cot_sft.pkl.ab12cd_4", "cot_sft.pkl", b"cot"),  # an older version's dir: never resumed
                 (".download-mix_sft.pkl", "mix_sft.pkl", b"mix"),  # mix_sft.pkl is complete: this partial is stale
                 (".download-grpo.pkl", "grpo.pkl", b"XXXX")]  # resumed, not a prefix of grpo.pkl: the hash refuses it
    for directory, name, partial in leftovers:
        (data_dir / directory).mkdir(parents=True)
        (data_dir / directory / f"{name}.incomplete").write_bytes(partial)
    (data_dir / "mix_sft.pkl").write_bytes(hub.files["mix_sft.pkl"])
    files = FileDataset(["cot_sft.pkl", "mix_sft.pkl", "grpo.pkl"], data_dir=data_dir, prefetch=False)
    assert [files[i].read_bytes() for i in range(3)] == [hub.files[n] for n in files.files]
    assert data_dir_entries(data_dir) == ["cot_sft.pkl", "grpo.pkl", "mix_sft.pkl"]
    assert hub.ranges == [("cot_sft.pkl", None), ("grpo.pkl", "bytes=4-"), ("grpo.pkl", None)]


def _rank_main(rank: int, world_size: int, port: int, data_dir: str, out_dir: str):
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    files = FileDataset(["cot_sft.pkl", "nope.pkl"], data_dir=data_dir, prefetch=False)
    result = {"path": str(files[0])}
    result["size"] = os.path.getsize(result["path"])  # every rank sees the complete file once indexing returns
    try:
        files[1]
    except DataFileError as e:
        result["error"] = str(e)
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_two_processes_rank0_downloads_others_wait_and_share_errors(hub, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data_dir = tmp_path / "data"
    mp.start_processes(_rank_main, args=(2, port, str(data_dir), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert hub.file_requests() == ["cot_sft.pkl"]  # downloaded once, by rank 0 (the unknown file is not listed)
    for result in results:
        assert result["size"] == len(hub.files["cot_sft.pkl"])
        assert "nope.pkl is not a file of ModelScope dataset" in result["error"]  # rank 1 gets rank 0's error


# --- conversion of the original .pkl files into memory-mapped .npy files ---------------------------------------------

VOCAB = 100
PICKLES = {  # the original's structures (training.md section 4), small
    "pretrain": [5, 6, 7, 2, 9, 9, 2] * 20,
    "sft": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
    "dpo": [{"chosen": [1, 2], "rejected": [3]}, {"chosen": [4], "rejected": [5, 6, 7]}],
    "grpo": [{"prompt": [1, 2, 3], "answer": [4]}, {"prompt": [5], "answer": [6, 7]}],
}


def _pickled(value) -> bytes:
    import pickle

    return pickle.dumps(value, protocol=4)


@pytest.fixture
def pickle_hub(hub):
    hub.files.clear()
    hub.files.update({f"{task}.pkl": _pickled(value) for task, value in PICKLES.items()})
    return hub


@pytest.mark.parametrize("task", list(PICKLES))
def test_pkl_files_are_converted_once_into_npy_files_that_load_as_the_pkl_does(pickle_hub, tmp_path, task):
    from trainer.token_files import load_collection, load_stream

    data_dir = tmp_path / "data"
    path = FileDataset([f"{task}.pkl"], data_dir=data_dir, task=task, vocab_size=VOCAB)[0]
    assert path == data_dir / f"{task}.pkl.npy"
    pkl = data_dir / f"{task}.pkl"
    if task == "pretrain":
        assert load_stream(path, VOCAB).tolist() == load_stream(pkl, VOCAB).tolist() == PICKLES[task]
        assert isinstance(load_stream(path, VOCAB), np.memmap)
    else:
        converted, original = load_collection(path, task, VOCAB), load_collection(pkl, task, VOCAB)
        assert converted.keys() == original.keys()
        for field in converted:
            assert [converted[field][i].tolist() for i in range(len(converted[field]))] == \
                   [original[field][i].tolist() for i in range(len(original[field]))]
    record = json.loads((data_dir / f"{task}.pkl.converted.json").read_text())
    assert record["task"] == task and record["bytes"] == pkl.stat().st_size
    written = {data_dir / name: (data_dir / name).stat().st_mtime_ns for name in record["files"]}
    assert path in written or task in ("dpo", "grpo")  # DPO and GRPO fields live in name.<field>.npy files

    again = FileDataset([f"{task}.pkl"], data_dir=data_dir, task=task, vocab_size=VOCAB)[0]
    assert again == path and {p: p.stat().st_mtime_ns for p in written} == written  # not converted again
    assert pickle_hub.file_requests() == [f"{task}.pkl"]


def test_converted_files_are_used_without_the_pkl_and_a_new_pkl_is_converted_again(pickle_hub, tmp_path, monkeypatch):
    from trainer.token_files import load_stream

    data_dir = tmp_path / "data"
    FileDataset(["pretrain.pkl"], data_dir=data_dir, task="pretrain", vocab_size=VOCAB)[0]
    (data_dir / "pretrain.pkl").unlink()
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any download would fail
    path = FileDataset(["pretrain.pkl"], data_dir=data_dir, task="pretrain", vocab_size=VOCAB)[0]
    assert load_stream(path, VOCAB).tolist() == PICKLES["pretrain"]

    (data_dir / "pretrain.pkl").write_bytes(_pickled([3, 4, 2]))  # a different file under the same name
    path = FileDataset(["pretrain.pkl"], data_dir=data_dir, task="pretrain", vocab_size=VOCAB)[0]
    assert load_stream(path, VOCAB).tolist() == [3, 4, 2]


def test_delete_consumed_removes_each_pkl_once_converted_and_the_converted_files_once_past_them(
        pickle_hub, tmp_path, capsys):
    pickle_hub.files |= {"sft_b.pkl": _pickled([[9, 8], [7]]), "sft_c.pkl": _pickled([[6]])}
    data_dir = tmp_path / "data"
    files = FileDataset(["sft.pkl", "sft_b.pkl", "sft_c.pkl"], data_dir=data_dir, delete_consumed=True, task="sft",
                        vocab_size=VOCAB)
    for i in range(3):
        files[i]
    converted = [".converted.json", ".npy", ".offsets.npy"]
    # file 0 keeps its converted files (the held-out split lives there); file 1 is gone; no .pkl is left
    assert data_dir_entries(data_dir) == [f"{name}{end}" for name in ("sft.pkl", "sft_c.pkl") for end in converted]
    assert pickle_hub.file_requests() == ["sft.pkl", "sft_b.pkl", "sft_c.pkl"]
    # a second epoch downloads the deleted file again, and says so
    capsys.readouterr()
    assert files[0] == data_dir / "sft.pkl.npy" and files[1] == data_dir / "sft_b.pkl.npy"
    assert pickle_hub.file_requests() == ["sft.pkl", "sft_b.pkl", "sft_c.pkl", "sft_b.pkl"]
    assert "downloading sft_b.pkl again: delete_consumed_files deleted it after an earlier epoch" in \
        capsys.readouterr().err


def test_two_runs_sharing_a_data_dir_download_and_convert_a_file_once(pickle_hub, tmp_path):
    from trainer.token_files import load_collection

    pickle_hub.download_delay_s = 0.5
    data_dir = tmp_path / "data"
    first, second = (FileDataset(["sft.pkl"], data_dir=data_dir, prefetch=False, task="sft", vocab_size=VOCAB)
                     for _ in range(2))
    results = {}
    thread = threading.Thread(target=lambda: results.update(first=first[0]))
    thread.start()
    deadline = time.time() + 60
    while not pickle_hub.file_requests():  # the first run is downloading
        assert thread.is_alive() and time.time() < deadline
        time.sleep(0.01)
    results["second"] = second[0]  # waits for the first's lock, then finds the file downloaded and converted
    thread.join()
    assert results["first"] == results["second"] == data_dir / "sft.pkl.npy"
    assert pickle_hub.file_requests() == ["sft.pkl"]
    assert load_collection(results["second"], "sft", VOCAB)[None][2].tolist() == PICKLES["sft"][2]
    assert data_dir_entries(data_dir) == ["sft.pkl", "sft.pkl.converted.json", "sft.pkl.npy", "sft.pkl.offsets.npy"]


def test_a_pkl_that_does_not_hold_the_task_is_a_clear_error_and_nothing_is_recorded(pickle_hub, tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(Exception, match=r"dpo\.pkl: item 0 must be a dict with exactly the keys \('prompt', 'answer'\)"):
        FileDataset(["dpo.pkl"], data_dir=data_dir, task="grpo", vocab_size=VOCAB)[0]
    assert not (data_dir / "dpo.pkl.converted.json").exists()
    with pytest.raises(Exception, match=r"token ids must lie in \[0, 8\)"):
        FileDataset(["sft.pkl"], data_dir=data_dir, task="sft", vocab_size=8)[0]
    assert not (data_dir / "sft.pkl.converted.json").exists()
    with pytest.raises(ValueError, match="both task and vocab_size"):
        FileDataset(["sft.pkl"], data_dir=data_dir, task="sft")


def test_a_converted_sft_file_is_not_read_as_a_pretrain_stream(pickle_hub, tmp_path):
    from trainer.token_files import TokenFileError, load_stream

    path = FileDataset(["sft.pkl"], data_dir=tmp_path / "data", task="sft", vocab_size=VOCAB)[0]
    with pytest.raises(TokenFileError, match=r"sft\.pkl\.npy is an SFT collection \(sft\.pkl\.offsets\.npy lies"):
        load_stream(path, VOCAB)


# --- the full preset's structure trained against the hub: files fetched as training reaches them ---------------------

def _full_preset_config(tmp_path, delete: bool):
    from dataclasses import replace

    import utils
    from model import tiny_config
    from trainer.tokenizer import TINY_VOCAB_SIZE

    full = utils.stage_config("pretrain_stage0", preset="full")
    data = replace(full.data, data_dir=str(tmp_path / "data"), max_seq_len=16, delete_consumed_files=delete)
    return replace(full, model=tiny_config(TINY_VOCAB_SIZE), tokenizer="tiny", data=data, micro_batch_size=4,
                   grad_accum_steps=1, backend="single", precision="fp32", save_every_steps=3, eval_every_steps=0,
                   eval_prompts=[], run_root=str(tmp_path / "runs"))


def _train_full_preset(config, hub, crash_at=None):
    import utils
    from trainer.loop import run_stage
    from trainer.tasks import LanguageModelingTask
    from trainer.tokenizer import get_tokenizer

    seen = {"calls": 0, "at_step_1": None}

    class Task(LanguageModelingTask):
        def loss(self, forward, batch):
            seen["calls"] += 1
            if seen["at_step_1"] is None:
                seen["at_step_1"] = hub.file_requests()
            if seen["calls"] == crash_at:
                raise KeyboardInterrupt("killed")
            return super().loss(forward, batch)

    files = utils.data_files(config)
    try:
        run_stage(config, lambda c: Task(c, get_tokenizer(c.tokenizer), files, kind="pretrain"))
    except KeyboardInterrupt:
        files._join_prefetch()  # a killed process downloads nothing more: the download in flight lands now or never
    return seen


@pytest.mark.parametrize("delete", [False, True])
def test_full_preset_downloads_each_file_once_as_training_reaches_it_across_a_resume(hub, tmp_path, delete):
    import math
    from dataclasses import replace

    import utils
    from trainer.cli import build_task
    from trainer.loop import Trainer
    from trainer.metrics import read_metrics
    from trainer.tokenizer import TINY_VOCAB_SIZE

    names = STAGE_FILES["pretrain_stage0"]  # the full preset's 8 shards, in the original's pickle format
    rng = np.random.default_rng(0)
    tokens = {name: rng.integers(0, TINY_VOCAB_SIZE, 16 * (16 + 3 * i) + 5).tolist() for i, name in enumerate(names)}
    hub.files.clear()
    hub.files.update({name: _pickled(t) for name, t in tokens.items()})
    config = _full_preset_config(tmp_path, delete)
    # windows of 16 tokens, one held out (0.1%, at least one) of file 0 only, micro-batches of 4 windows: a step each
    steps = [(len(tokens[name]) // 16 - (i == 0)) // 4 for i, name in enumerate(names)]  # 3, 4, 5, 6, 7, 7, 8, 9
    crash_at = sum(steps[:4]) + 2  # in file 4; the last checkpoint (step 18) is file 3's end: the resume opens file 4

    first = _train_full_preset(config, hub, crash_at)
    assert first["at_step_1"] in (names[:1], names[:2])  # the first file, and maybe the prefetched next, nothing else
    run = tmp_path / "runs" / "pretrain_stage0"
    schedule = json.loads((run / "schedule.json").read_text())
    # estimated from the listed sizes at file 0's windows per byte (tiny files: each file's steps are rounded down)
    assert not schedule["exact"] and abs(schedule["total_steps"] - sum(steps)) <= 0.1 * sum(steps)
    before_resume = hub.file_requests()
    assert before_resume == names[:6]  # files 0-4 reached, file 5 prefetched

    second = _train_full_preset(config, hub)
    assert second["at_step_1"] == before_resume  # the resume fetched nothing before its first step
    assert hub.file_requests() == names  # every file downloaded exactly once over both runs
    assert json.loads((run / "schedule.json").read_text()) == schedule  # the resume kept the recorded schedule
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, sum(steps) + 1))  # all the data, whatever the estimate said
    assert json.loads((run / "stage.json").read_text())["steps"] == sum(steps)
    assert all(math.isfinite(r["loss"]) for r in records)
    left = {p.name for p in (tmp_path / "data").iterdir()}
    if delete:  # no .pkl left; file 0 (the held-out split) and the last file's converted tokens stay
        assert left == {f"{n}{end}" for n in (names[0], names[-1]) for end in (".npy", ".converted.json")}
    else:
        assert left == {f"{n}{end}" for n in names for end in ("", ".npy", ".converted.json")}
        # every file on disk: a new run counts its schedule exactly, without a download
        config = replace(config, run_root=str(tmp_path / "again"))
        trainer = Trainer(config, lambda c: build_task(c, utils.data_files(c)))
        assert trainer.count_steps() == (sum(steps), True)
        assert hub.file_requests() == names


@pytest.mark.parametrize("kind", ["npy", "jsonl", "too small"])
def test_data_with_nothing_to_train_on_is_named_with_what_to_do(tmp_path, kind):
    from dataclasses import replace

    import utils
    from trainer.cli import build_task
    from trainer.errors import InputError
    from trainer.loop import run_stage
    from trainer.token_files import TokenFileError, save_stream

    config = _full_preset_config(tmp_path, delete=False)
    if kind == "jsonl":
        path = tmp_path / "empty.jsonl"
        path.write_text("\n")
        config = replace(config, task="sft", data=replace(config.data, files=[], jsonl_files=[str(path)]))
        error, expected = TokenFileError, re.escape(f"{path}: the data file holds no items")
    else:  # a local token file: used as it is, nothing is downloaded
        path = save_stream(tmp_path / "data" / "short.npy", [5, 6, 7] * (1 if kind == "npy" else 8), VOCAB)
        config = replace(config, data=replace(config.data, files=["short.npy"]))
        error = TokenFileError
        expected = re.escape(f"{path}: the data file holds fewer than data.max_seq_len = 16 tokens")
    expected += r".*Replace it .*or remove it from the stage's data files"
    if kind == "too small":  # one window: not enough for one micro-batch of 4
        error, expected = InputError, (r"the stage's data gives no optimizer step: short\.npy \(1 items\); each rank "
                                       r"needs .* = 4 items of a file for one step .* lower --micro-batch-size")
    with pytest.raises(error, match=expected):
        run_stage(config, lambda c: build_task(c, utils.data_files(c)))


def test_data_dir_dataset_id_and_deletion_are_set_by_environment_or_flag(monkeypatch, tmp_path):
    import utils
    from trainer.cli import parse_overrides

    monkeypatch.setenv("CORTEX_DATA_DIR", str(tmp_path / "shards"))
    monkeypatch.setenv("CORTEX_DATASET_ID", "me/my-data")
    config = utils.stage_config("pretrain_stage0", preset="full")
    files = utils.data_files(config)
    assert (files.data_dir, files.dataset_id, files.delete_consumed) == (tmp_path / "shards", "me/my-data", False)
    flags = ["--data-dir", str(tmp_path / "d"), "--dataset-id", "o/n", "--delete-consumed-files"]
    config, _ = parse_overrides(config, flags)
    files = utils.data_files(config)
    assert (files.data_dir, files.dataset_id, files.delete_consumed) == (tmp_path / "d", "o/n", True)
    assert not parse_overrides(config, ["--no-delete-consumed-files"])[0].data.delete_consumed_files


def test_a_damaged_converted_file_is_converted_again_as_its_error_says(pickle_hub, tmp_path):
    from trainer.token_files import TokenFileError, load_collection

    data_dir = tmp_path / "data"
    path = FileDataset(["dpo.pkl"], data_dir=data_dir, task="dpo", vocab_size=VOCAB)[0]
    damaged = data_dir / "dpo.pkl.rejected.npy"
    damaged.write_bytes(damaged.read_bytes()[:-2])
    with pytest.raises(TokenFileError, match=r"dpo\.pkl\.rejected\.npy: .*damaged.* delete dpo\.pkl\.converted\.json "
                                             r"beside it and the next run converts dpo\.pkl again"):
        load_collection(path, "dpo", VOCAB)
    (data_dir / "dpo.pkl.converted.json").unlink()
    path = FileDataset(["dpo.pkl"], data_dir=data_dir, task="dpo", vocab_size=VOCAB)[0]
    assert [load_collection(path, "dpo", VOCAB)["rejected"][i].tolist() for i in range(2)] == [[3], [5, 6, 7]]
