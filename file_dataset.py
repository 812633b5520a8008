"""The token files of each Cortex training stage, fetched on first use from the ModelScope dataset
qibin0506/Cortex-2.5-train-data into a data dir (default ./data).

    files = FileDataset.for_stage("cot")      # ["cot_sft.pkl"]
    path = files[0]                           # ./data/cot_sft.pkl, downloaded if missing

One process per machine (local rank 0) downloads while the others wait; the next file is prefetched in a background
thread; the file before the current one is deleted only when delete_consumed=True (off by default: deleting means a
second epoch or a resume downloads it again). A download lands in a temporary directory and is renamed into place only
when complete (ModelScope checks the size and sha256 it lists), so the data dir never holds a partial file.
MODELSCOPE_ENDPOINT points the download at another hub (tests use a local server).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import torch.distributed as dist

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


class DataFileError(RuntimeError):
    """A stage data file is missing and could not be downloaded; the message says where to put it."""


def download_file(name: str, data_dir: str | Path, dataset_id: str = MODELSCOPE_DATASET) -> Path:
    """Fetch `name` from the ModelScope dataset into data_dir/name (through a temporary directory)."""
    import requests  # a dependency of modelscope; imported here, as modelscope is, to keep imports cheap
    from modelscope.hub.errors import HubError
    from modelscope.hub.snapshot_download import dataset_snapshot_download

    data_dir = Path(data_dir)
    target = data_dir / name
    where_to_put = (f"Put the file at {target.resolve()} yourself (from https://modelscope.cn/datasets/{dataset_id}), "
                    f"or make token files with process_data.py")
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".download-{name}.", dir=data_dir))
    try:
        try:
            # modelscope reads MODELSCOPE_ENDPOINT once per process and caches it; pass it explicitly so the
            # current value counts
            dataset_snapshot_download(dataset_id, local_dir=str(tmp_dir), allow_file_pattern=[name],
                                      endpoint=os.environ.get("MODELSCOPE_ENDPOINT") or None)
        except (HubError, requests.RequestException) as e:
            raise DataFileError(f"could not download {name} from ModelScope dataset {dataset_id}: {e}\n"
                                f"{where_to_put}") from e
        downloaded = tmp_dir / name
        if not downloaded.is_file():  # ModelScope returns silently when no file matches
            raise DataFileError(f"{name} is not a file of ModelScope dataset {dataset_id}. {where_to_put}")
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(tmp_dir)
    return target


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
                 prefetch: bool = True, delete_consumed: bool = False):
        if not files:
            raise ValueError("FileDataset needs at least one file name")
        self.files, self.data_dir, self.dataset_id = list(files), Path(data_dir), dataset_id
        self.prefetch, self.delete_consumed = prefetch, delete_consumed
        self._prefetch_thread: threading.Thread | None = None

    @classmethod
    def for_stage(cls, stage: str, **kwargs) -> "FileDataset":
        if stage not in STAGE_FILES:
            raise ValueError(f"no ModelScope file list for stage {stage!r}; stages: {', '.join(STAGE_FILES)}")
        return cls(STAGE_FILES[stage], **kwargs)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, idx: int) -> Path:
        return self.data_dir / self.files[idx]

    def __getitem__(self, idx: int) -> Path:
        target = self.path(idx)
        error = None
        if _is_downloader():
            self._join_prefetch()
            if not target.exists():
                try:
                    download_file(self.files[idx], self.data_dir, self.dataset_id)
                except Exception as e:  # any failure is handed to every process below (so none waits forever), then raised
                    error = e
        if _distributed():  # also the barrier: the others wait here until the file is in place
            messages = [None] * dist.get_world_size()
            dist.all_gather_object(messages, None if error is None else str(error))
            error = error or next((DataFileError(m) for m in messages if m), None)
        if error is not None:
            raise error
        if _is_downloader():
            self._after_fetch(idx)
        return target

    def _after_fetch(self, idx: int) -> None:
        next_name = self.files[idx + 1] if idx + 1 < len(self.files) else None
        if self.delete_consumed and idx > 0 and self.files[idx - 1] not in (self.files[idx], next_name):
            self.path(idx - 1).unlink(missing_ok=True)
        if self.prefetch and next_name is not None and not (self.data_dir / next_name).exists():
            self._prefetch_thread = threading.Thread(target=self._prefetch, args=(next_name,), daemon=True,
                                                     name=f"prefetch {next_name}")
            self._prefetch_thread.start()

    def _prefetch(self, name: str) -> None:
        try:
            download_file(name, self.data_dir, self.dataset_id)
        except DataFileError as e:  # not fatal yet: __getitem__ downloads it again and raises if it still fails
            print(f"prefetch of {name} failed, retrying when it is needed: {e}", file=sys.stderr)

    def _join_prefetch(self) -> None:
        if self._prefetch_thread is not None:
            self._prefetch_thread.join()
            self._prefetch_thread = None
