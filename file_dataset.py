"""The token files of each Cortex training stage, fetched on first use from the ModelScope dataset
qibin0506/Cortex-2.5-train-data into a data dir (default ./data).

    files = FileDataset.for_stage("cot")      # ["cot_sft.pkl"]
    path = files[0]                           # ./data/cot_sft.pkl, downloaded if missing

    files = FileDataset.for_stage("cot", task="sft", vocab_size=46957)
    path = files[0]                           # ./data/cot_sft.pkl.npy (cot_sft.pkl, downloaded, converted once)

Files are fetched as training reaches them (indexing is "training reached file idx"): one process per machine (local
rank 0) downloads while the others wait, and the next file is prefetched in a background thread. delete_consumed=True
deletes each file once training has moved past it (off by default), except the first, whose held-out split every eval
and every resume reads, and the last (each epoch ends with it); a converted .pkl goes as soon as it is converted. With
deletion each later epoch downloads (and converts) the others again, and says so.
`fetch(idx)` gets a file without deleting or prefetching anything (the eval split's file, counting).

Two runs sharing a data dir download and convert a file once: the first holds data_dir/.NAME.lock meanwhile, the
second waits for it, then finds it there. A download lands in data_dir/.download-NAME/ and is renamed into place only
when complete (ModelScope checks the size and sha256 it lists), so the data dir never holds a partial file. A download
cut short (kill, lost connection) leaves its partial file there, and the next download of NAME resumes it with an HTTP
Range request (ModelScope's own resume); the directory of a file that is complete, and those of older versions
(.download-NAME.XXXXXXXX), are removed.
MODELSCOPE_ENDPOINT points the download at another hub (tests use a local server). `source_bytes(idx)` is a file's size
as published (from the hub's listing before it is downloaded), which the trainer uses to estimate the length of a
stage whose files are not all on disk yet (trainer/loop.py).

Given the task and vocabulary size (the trainer gives both), each name.pkl is converted once into our memory-mapped
format beside it, addressed as name.pkl.npy (trainer/token_files.py; a name no token file of ours takes), by the same
one process per machine, and indexing returns that path: unpickled, the original's files are Python ints (about 36
bytes per token) in every process. name.pkl.converted.json records the .pkl's size and modification time; a different
.pkl under that name is converted again, and the converted files stay usable when the .pkl is deleted.
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from trainer.errors import InputError
from trainer.token_files import convert_pickle

MODELSCOPE_DATASET = "qibin0506/Cortex-2.5-train-data"

# training.md section 4.2; keys are the stage names of trainer/config.py
STAGE_FILES: dict[str, list[str]] = {
    "pretrain_stage0": [f"pretrain_short_{i}.pkl" for i in range(8)],
    "pretrain_stage1": [f"pretrain_long_{i}.pkl" for i in range(2)],
    "cot": ["cot_sft.pkl"],
    "grpo": ["grpo.pkl"],
    "mix": ["mix_sft.pkl"],
    "dpo": ["dpo.pkl"],
    "distill": ["cot_sft.pkl", "mix_sft.pkl"],
}


class DataFileError(InputError, RuntimeError):
    """A stage data file is missing and could not be downloaded; the message says where to put it."""


def download_dir(name: str, data_dir: str | Path) -> Path:
    """Where `name` is downloaded to before it is renamed into place; a partial download there is resumed."""
    return Path(data_dir) / f".download-{name}"


def remove_download_dirs(name: str, data_dir: str | Path) -> None:
    """The download directory of `name` and those older versions made (.download-NAME.XXXXXXXX, never resumed)."""
    data_dir = Path(data_dir)
    legacy = re.compile(re.escape(f".download-{name}.") + r"[a-z0-9_]{8}")
    for path in [download_dir(name, data_dir), *(p for p in data_dir.glob(glob.escape(f".download-{name}.") + "*")
                                                  if legacy.fullmatch(p.name))]:
        if path.is_dir():
            shutil.rmtree(path)


@contextmanager
def file_lock(name: str, data_dir: str | Path):
    """Held while `name` is downloaded and converted, so that two runs sharing a data dir never write it at once: the
    second waits, then finds it done. The lock file (data_dir/.NAME.lock) goes when released; a waiter whose lock file
    was removed meanwhile locks the new one."""
    path = Path(data_dir) / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        lock = open(path, "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        lock.close()


def download_file(name: str, data_dir: str | Path, dataset_id: str = MODELSCOPE_DATASET) -> Path:
    """Fetch `name` from the ModelScope dataset into data_dir/name (through data_dir/.download-NAME/, resuming a
    partial download left there)."""
    import requests  # a dependency of modelscope; imported here, as modelscope is, to keep imports cheap
    from modelscope.hub.errors import HubError
    from modelscope.hub.snapshot_download import dataset_snapshot_download

    data_dir = Path(data_dir)
    target = data_dir / name
    where_to_put = (f"Put the file at {target.resolve()} yourself (from https://modelscope.cn/datasets/{dataset_id}), "
                    f"or make token files with process_data.py")
    tmp_dir = download_dir(name, data_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        # modelscope reads MODELSCOPE_ENDPOINT once per process and caches it; pass it explicitly so the
        # current value counts
        dataset_snapshot_download(dataset_id, local_dir=str(tmp_dir), allow_file_pattern=[name],
                                  endpoint=os.environ.get("MODELSCOPE_ENDPOINT") or None)
    except (HubError, requests.RequestException) as e:
        if not any(p.is_file() and p.stat().st_size for p in tmp_dir.rglob("*")):  # nothing worth resuming
            shutil.rmtree(tmp_dir)
        raise DataFileError(f"could not download {name} from ModelScope dataset {dataset_id}: {e}\n"
                            f"{where_to_put}") from e
    downloaded = tmp_dir / name
    if not downloaded.is_file():  # ModelScope returns silently when no file matches
        shutil.rmtree(tmp_dir)
        raise DataFileError(f"{name} is not a file of ModelScope dataset {dataset_id}. {where_to_put}")
    os.replace(downloaded, target)
    remove_download_dirs(name, data_dir)
    return target


def listed_sizes(dataset_id: str = MODELSCOPE_DATASET) -> dict[str, int]:
    """{file name: bytes} of the ModelScope dataset, from its listing (nothing is downloaded)."""
    import requests
    from modelscope.hub.errors import HubError
    from modelscope_hub import HubApi

    try:
        files = HubApi(endpoint=os.environ.get("MODELSCOPE_ENDPOINT") or None).list_repo_files(dataset_id, "dataset")
    except (HubError, requests.RequestException) as e:
        raise DataFileError(f"could not list the files of ModelScope dataset {dataset_id}: {e}") from e
    return {f.path: f.size for f in files if not f.is_dir}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_downloader() -> bool:
    # one download per machine; every process of the job reads the same data dir
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        return int(local_rank) == 0
    return not _distributed() or dist.get_rank() == 0


class FileDataset:
    """An indexable list of a stage's data files; indexing returns the local path, downloading it first if needed."""

    def __init__(self, files: list[str], data_dir: str | Path = "./data", dataset_id: str = MODELSCOPE_DATASET,
                 prefetch: bool = True, delete_consumed: bool = False, task: str | None = None,
                 vocab_size: int | None = None):
        if not files:
            raise ValueError("FileDataset needs at least one file name")
        if (task is None) != (vocab_size is None):
            raise ValueError("FileDataset converts .pkl files with both task and vocab_size, or neither")
        self.files, self.data_dir, self.dataset_id = list(files), Path(data_dir), dataset_id
        self.prefetch, self.delete_consumed = prefetch, delete_consumed
        self.task, self.vocab_size = task, vocab_size
        self._prefetch_thread: threading.Thread | None = None
        self._prefetching: str | None = None  # the name the prefetch thread is downloading
        self._listed_sizes: dict[str, int] | None = None
        self._deleted: set[str] = set()  # files this object deleted (delete_consumed): a later epoch fetches them again

    @classmethod
    def for_stage(cls, stage: str, **kwargs) -> "FileDataset":
        if stage not in STAGE_FILES:
            raise ValueError(f"no ModelScope file list for stage {stage!r}; stages: {', '.join(STAGE_FILES)}")
        return cls(STAGE_FILES[stage], **kwargs)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, idx: int) -> Path:
        """The file as downloaded."""
        return self.data_dir / self.files[idx]

    def local_path(self, idx: int) -> Path:
        """What indexing returns: the downloaded file, or for a converted name.pkl name.pkl.npy."""
        path = self.path(idx)
        return path.with_name(path.name + ".npy") if self._converts(idx) else path

    def is_ready(self, idx: int) -> bool:
        """Whether local_path(idx) can be read now, without a download or a conversion."""
        return self._is_converted(idx) if self._converts(idx) else self.path(idx).exists()

    def source_bytes(self, idx: int) -> int:
        """The size of file idx as published: on disk, recorded by its conversion, or listed by the hub."""
        record = self._record(idx) if self._converts(idx) else None
        if record is not None and record.get("task") == self.task:
            return record["bytes"]
        if self.path(idx).exists():
            return self.path(idx).stat().st_size
        if self._listed_sizes is None:
            self._listed_sizes = listed_sizes(self.dataset_id)
        if self.files[idx] not in self._listed_sizes:
            raise DataFileError(f"{self.files[idx]} is not a file of ModelScope dataset {self.dataset_id}. Put the "
                                f"file at {self.path(idx).resolve()} yourself, or make token files with "
                                f"process_data.py")
        return self._listed_sizes[self.files[idx]]

    def __getitem__(self, idx: int) -> Path:
        """Training reached file idx: fetch it, delete the one before (delete_consumed), prefetch the next."""
        path = self.fetch(idx)
        if _is_downloader():
            self._after_fetch(idx)
        return path

    def fetch(self, idx: int) -> Path:
        """File idx on disk (downloaded and converted when needed), touching no other file."""
        error = None
        if _is_downloader():
            if self._prefetching == self.files[idx]:
                self._join_prefetch()
            try:
                with file_lock(self.files[idx], self.data_dir):
                    if self._needs_download(idx):
                        self._download(idx)
                    else:  # complete: a partial download of it, if a killed run left one, is stale
                        remove_download_dirs(self.files[idx], self.data_dir)
                    if self._converts(idx) and not self._is_converted(idx):
                        self._convert(idx)
            except Exception as e:  # any failure is handed to every process below (so none waits forever), then raised
                error = e
        if _distributed():  # also the barrier: the others wait here until the file is in place
            messages = [None] * dist.get_world_size()
            dist.all_gather_object(messages, None if error is None else str(error))
            error = error or next((DataFileError(m) for m in messages if m), None)
        if error is not None:
            raise error
        return self.local_path(idx)

    # --- conversion of .pkl files ---
    def _converts(self, idx: int) -> bool:
        return self.task is not None and self.path(idx).suffix == ".pkl"

    def _record_path(self, idx: int) -> Path:
        return self.path(idx).with_name(self.files[idx] + ".converted.json")

    def _source_record(self, idx: int) -> dict:
        stat = self.path(idx).stat()
        return {"source": self.files[idx], "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "task": self.task}

    def _record(self, idx: int) -> dict | None:
        """The conversion record of file idx, or None when it has none."""
        record_path = self._record_path(idx)
        if not record_path.exists():
            return None
        try:
            return json.loads(record_path.read_text())
        except ValueError as e:
            raise DataFileError(f"{record_path} is unreadable ({e}); delete it and {self.path(idx).name} is converted "
                                f"again") from e

    def _is_converted(self, idx: int) -> bool:
        record = self._record(idx)
        if record is None or record.get("task") != self.task:
            return False
        if not self.path(idx).exists():  # converted, then the .pkl deleted: the converted files are the data
            return True
        source = self._source_record(idx)
        return record.get("bytes") == source["bytes"] and record.get("mtime_ns") == source["mtime_ns"]

    def _convert(self, idx: int) -> None:
        print(f"converting {self.path(idx)} to memory-mapped token files (once)", file=sys.stderr)
        written = convert_pickle(self.path(idx), self.task, self.vocab_size, self.local_path(idx))
        record_path = self._record_path(idx)
        tmp = record_path.with_name(record_path.name + ".tmp")
        tmp.write_text(json.dumps(self._source_record(idx) | {"files": [p.name for p in written]}))
        os.replace(tmp, record_path)  # written last: a conversion cut short is done again
        if self.delete_consumed:  # the converted files are the data from now on
            self.path(idx).unlink()

    def _needs_download(self, idx: int) -> bool:
        return not self.path(idx).exists() and not (self._converts(idx) and self._is_converted(idx))

    def _download(self, idx: int) -> None:
        if self.files[idx] in self._deleted:
            print(f"downloading {self.files[idx]} again: delete_consumed_files deleted it after an earlier epoch",
                  file=sys.stderr)
        download_file(self.files[idx], self.data_dir, self.dataset_id)

    def _delete(self, idx: int) -> None:
        """The file and, for a converted .pkl, its converted files and record."""
        record = self._record(idx) if self._converts(idx) else None
        if record is not None:
            for name in record.get("files", []):
                (self.data_dir / name).unlink(missing_ok=True)
            self._record_path(idx).unlink()
        self.path(idx).unlink(missing_ok=True)
        self._deleted.add(self.files[idx])

    def _after_fetch(self, idx: int) -> None:
        next_idx = idx + 1 if idx + 1 < len(self.files) else None
        next_name = self.files[next_idx] if next_idx is not None else None
        consumed = self.files[idx - 1] if idx > 1 else None  # file 0 stays: it holds the held-out split
        if self.delete_consumed and consumed not in (None, self.files[0], self.files[idx], next_name):
            self._delete(idx - 1)
        if (self.prefetch and next_idx is not None and self._prefetching != next_name
                and self._needs_download(next_idx)):
            self._join_prefetch()
            self._prefetching = next_name
            self._prefetch_thread = threading.Thread(target=self._prefetch, args=(next_idx,), daemon=True,
                                                     name=f"prefetch {next_name}")
            self._prefetch_thread.start()

    def _prefetch(self, idx: int) -> None:
        try:
            with file_lock(self.files[idx], self.data_dir):
                if self._needs_download(idx):  # another run sharing the data dir may have fetched it meanwhile
                    self._download(idx)
        except DataFileError as e:  # not fatal yet: fetch downloads it again and raises if it still fails
            print(f"prefetch of {self.files[idx]} failed, retrying when it is needed: {e}", file=sys.stderr)

    def _join_prefetch(self) -> None:
        if self._prefetch_thread is not None:
            self._prefetch_thread.join()
            self._prefetch_thread, self._prefetching = None, None
