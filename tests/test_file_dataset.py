"""FileDataset downloads through the real modelscope client, pointed (MODELSCOPE_ENDPOINT) at a local fake hub that
speaks the ModelScope dataset protocol (dependencies.md section 4)."""
import hashlib
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from file_dataset import MODELSCOPE_DATASET, STAGE_FILES, DataFileError, FileDataset, download_file


class FakeHub:
    """Files served as dataset MODELSCOPE_DATASET. `listed_sha256` overrides the sha256 the listing announces and
    `missing` names files that are listed but answer 404 (both to exercise failures)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.listed_sha256: dict[str, str] = {}
        self.missing: set[str] = set()
        self.requests: list[str] = []
        self.download_delay_s = 0.0
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
                    self._send(200, hub.files[name], "application/octet-stream")
                else:  # e.g. /api/v1/repos/internalAccelerationInfo
                    self._send(404, json.dumps({"Code": 404, "Message": "not found"}).encode())

            def _send(self, status, body, content_type="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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
    assert not (data_dir / "cot_sft.pkl").exists()  # consumed file deleted
    files[2]
    assert hub.file_requests() == ["cot_sft.pkl", "mix_sft.pkl", "grpo.pkl"]
    assert data_dir_entries(data_dir) == ["grpo.pkl"]


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


def test_delete_consumed_removes_the_converted_files_too(pickle_hub, tmp_path):
    pickle_hub.files["sft_b.pkl"] = _pickled([[9, 8], [7]])
    data_dir = tmp_path / "data"
    files = FileDataset(["sft.pkl", "sft_b.pkl"], data_dir=data_dir, delete_consumed=True, task="sft", vocab_size=VOCAB)
    files[0]
    files[1]
    assert data_dir_entries(data_dir) == ["sft_b.pkl", "sft_b.pkl.converted.json", "sft_b.pkl.npy",
                                          "sft_b.pkl.offsets.npy"]


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
