"""Datasets and batch builders for every stage: pretrain (packed windows), SFT, DPO and GRPO.

Sources: our .npy token files and the original .pkl files (trainer/token_files.py), or JSONL tokenised at load
(the formats of sample_data/: {"text"}, {"messages"}, {"chosen","rejected"}, {"prompt","answer"}).
Every dataset is indexable and deterministic; its `collate` method builds the batch for a DataLoader.

Held-out split: JSONL lines carrying a "split" field ("train"/"eval") are split by it; otherwise the last
`eval_fraction` of the items (windows for pretrain token files, records for JSONL) is the eval split.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from model.head import IGNORE_INDEX  # the label value the model's head does not score (and the loss ignores)
from trainer.errors import DataError
from trainer.token_files import RaggedTokens, TokenFileError, load_collection, load_stream, token_dtype

ROLES = ("system", "user", "assistant")
TASKS = ("pretrain", "sft", "dpo", "grpo")
Split = Literal["all", "train", "eval"]


@dataclass(frozen=True)
class SpecialIds:
    """The token ids batch building needs (taken from a trainer.tokenizer.Tokenizer)."""
    eos: int
    pad: int
    system: int
    user: int
    assistant: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        return cls(tokenizer.eos_id, tokenizer.pad_id, tokenizer.system_id, tokenizer.user_id, tokenizer.assistant_id)


# ----------------------------------------------------------------------------------------------------------------------
# Batch builders (pure functions on token tensors)

def packed_positions_and_mask(input_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-aware packing for a (B, T) batch of windows that hold several documents, each ending in </s>.

    position_ids restart at 0 right after each </s> (the </s> itself keeps its document's counter).
    doc_boundary_mask is (B, 1, T, T) bool, True where query t and key s lie in the same document, with
    doc_id[t] = number of </s> strictly before t. The model adds causality on top.
    """
    is_eos = input_ids == eos_id
    doc_id = torch.cumsum(is_eos, dim=1) - is_eos.long()
    t = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    starts_doc = torch.zeros_like(is_eos)  # a document starts at t = 0 and right after each </s>
    starts_doc[:, 1:] = is_eos[:, :-1]
    doc_start = torch.cummax(torch.where(starts_doc, t, 0), dim=1).values
    position_ids = t - doc_start
    doc_boundary_mask = (doc_id[:, :, None] == doc_id[:, None, :]).unsqueeze(1)
    return position_ids, doc_boundary_mask


def pretrain_batch(windows: Sequence[torch.Tensor], eos_id: int) -> dict[str, torch.Tensor]:
    input_ids = torch.stack(list(windows))  # windows all have block_size tokens: no padding
    position_ids, doc_boundary_mask = packed_positions_and_mask(input_ids, eos_id)
    # labels equal the inputs: the loss predicts labels[t+1] from position t.
    return {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": position_ids,
            "doc_boundary_mask": doc_boundary_mask}


def mask_prompt(input_ids: torch.Tensor, labels: torch.Tensor, ids: SpecialIds) -> torch.Tensor:
    """Labels with every system and user turn set to IGNORE_INDEX (the original's rule, vectorised).

    A span opens at <system> or <user> and closes at the next </s>, both ends included. Assistant turns (the <assistant>
    tag, <think>...</think><answer>...</answer> and their </s>) stay trained, the tag too, as in the original 0.9.2
    (inference always supplies it, so learning it is harmless). A span that never closes (the row was
    truncated inside a prompt) is masked to the end of the row: the original left it trainable, teaching the model to
    write user turns.
    """
    T = input_ids.shape[1]
    t = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    none = torch.full_like(t, -1)
    opens = (input_ids == ids.system) | (input_ids == ids.user)
    last_open = torch.cummax(torch.where(opens, t, none), dim=1).values
    last_eos = torch.cummax(torch.where(input_ids == ids.eos, t, none), dim=1).values
    last_eos_before = torch.cat([none[:, :1], last_eos[:, :-1]], dim=1)  # strictly before t: the closing </s> is masked
    in_prompt = last_open > last_eos_before
    return labels.masked_fill(in_prompt, IGNORE_INDEX)


def _padded_sft_tensors(seqs: Sequence[torch.Tensor], ids: SpecialIds, length: int):
    lengths = torch.tensor([len(s) for s in seqs])
    attention_mask = torch.arange(length)[None, :] < lengths[:, None]
    input_ids = torch.full((len(seqs), length), ids.pad, dtype=torch.long)
    input_ids[attention_mask] = torch.cat(list(seqs))
    labels = mask_prompt(input_ids, input_ids.masked_fill(~attention_mask, IGNORE_INDEX), ids)
    return input_ids, labels, attention_mask.long()


def sft_batch(seqs: Sequence[torch.Tensor], ids: SpecialIds) -> dict[str, torch.Tensor]:
    """Right-pad (inputs with <pad>, labels with IGNORE_INDEX) and mask the prompt turns."""
    input_ids, labels, attention_mask = _padded_sft_tensors(seqs, ids, max(len(s) for s in seqs))
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def dpo_batch(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], ids: SpecialIds) -> dict[str, torch.Tensor]:
    """Chosen and rejected padded to one common length (so they can be concatenated), prompt masked on both."""
    length = max(max(len(c), len(r)) for c, r in pairs)
    batch = {}
    for side, seqs in (("chosen", [c for c, _ in pairs]), ("rejected", [r for _, r in pairs])):
        input_ids, labels, attention_mask = _padded_sft_tensors(seqs, ids, length)
        batch |= {f"{side}_input_ids": input_ids, f"{side}_labels": labels, f"{side}_attention_mask": attention_mask}
    return batch


def grpo_batch(items: Sequence[dict]) -> dict[str, list]:
    """Prompts stay a list of 1-D tensors (the rollout pads them itself); answers are the gold strings."""
    return {"prompts": [item["prompt"] for item in items], "answers": [item["answer"] for item in items]}


# ----------------------------------------------------------------------------------------------------------------------
# Datasets

def _as_long(tokens: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64))


class PretrainDataset(Dataset):
    """Non-overlapping windows tokens[i:i+block] for i = 0, block, 2*block, ...; the tail that does not fill a window
    is dropped. Documents run across window borders."""

    def __init__(self, tokens: np.ndarray, block_size: int, eos_id: int, windows: Sequence[int] | None = None):
        self.tokens, self.block_size, self.eos_id = tokens, block_size, eos_id
        self.windows = range(len(tokens) // block_size) if windows is None else windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = self.windows[i] * self.block_size
        return _as_long(self.tokens[start:start + self.block_size])

    def collate(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return pretrain_batch(batch, self.eos_id)


class SFTDataset(Dataset):
    """Chat-templated conversations, right-truncated to max_len (num_truncated counts how many were cut)."""

    def __init__(self, seqs: RaggedTokens, max_len: int, ids: SpecialIds, items: Sequence[int] | None = None):
        self.seqs, self.max_len, self.ids = seqs, max_len, ids
        self.items = range(len(seqs)) if items is None else items
        self.num_truncated = int((seqs.lengths()[np.asarray(self.items, dtype=np.int64)] > max_len).sum())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _as_long(self.seqs[self.items[i]][:self.max_len])

    def collate(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return sft_batch(batch, self.ids)


class DPODataset(Dataset):
    """(chosen, rejected) conversations sharing a prompt; each side right-truncated to max_len. num_truncated counts
    pairs where either side was cut."""

    def __init__(self, chosen: RaggedTokens, rejected: RaggedTokens, max_len: int, ids: SpecialIds,
                 items: Sequence[int] | None = None):
        self.chosen, self.rejected, self.max_len, self.ids = chosen, rejected, max_len, ids
        self.items = range(len(chosen)) if items is None else items
        index = np.asarray(self.items, dtype=np.int64)
        too_long = (chosen.lengths()[index] > max_len) | (rejected.lengths()[index] > max_len)
        self.num_truncated = int(too_long.sum())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.items[i]
        return _as_long(self.chosen[j][:self.max_len]), _as_long(self.rejected[j][:self.max_len])

    def collate(self, batch) -> dict[str, torch.Tensor]:
        return dpo_batch(batch, self.ids)


class GRPODataset(Dataset):
    """Prompts (system+user template) with <assistant> appended, so the policy starts right at its answer and the
    <assistant> tag is neither generated nor scored; answers are the gold answer strings."""

    def __init__(self, prompts: RaggedTokens, answers: Sequence[str], assistant_id: int,
                 items: Sequence[int] | None = None):
        if len(prompts) != len(answers):
            raise ValueError(f"GRPODataset: {len(prompts)} prompts but {len(answers)} answers")
        self.prompts, self.answers, self.assistant_id = prompts, answers, assistant_id
        self.items = range(len(prompts)) if items is None else items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        j = self.items[i]
        prompt = _as_long(self.prompts[j])
        if len(prompt) == 0 or prompt[-1] != self.assistant_id:
            prompt = torch.cat([prompt, torch.tensor([self.assistant_id])])
        return {"prompt": prompt, "answer": self.answers[j]}

    def collate(self, batch: Sequence[dict]) -> dict[str, list]:
        return grpo_batch(batch)


# ----------------------------------------------------------------------------------------------------------------------
# Held-out split

def heldout_range(n: int, split: Split, eval_fraction: float) -> range:
    """Items of `split` among n: the last ceil(n * eval_fraction) items are eval (at least 1, and never all of them)."""
    if split not in ("all", "train", "eval"):
        raise ValueError(f"split must be 'all', 'train' or 'eval', got {split!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = min(math.ceil(n * eval_fraction - 1e-9), max(n - 1, 0))
    return {"all": range(n), "train": range(n - n_eval), "eval": range(n - n_eval, n)}[split]


# ----------------------------------------------------------------------------------------------------------------------
# JSONL records and their encoding (shared with process_data.py)

def read_jsonl(path: str | Path) -> list[tuple[str, object]]:
    """(location "file:line", parsed object) for every non-empty line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: JSONL file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append((f"{path}:{line_no}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: invalid JSON ({e})") from e
    return records


def split_labels(records: list[tuple[str, object]]) -> list[str] | None:
    """The records' "split" fields ("train"/"eval"), or None when no line carries one."""
    has_field = [isinstance(r, dict) and "split" in r for _, r in records]
    if not any(has_field):
        return None
    for (where, record), present in zip(records, has_field):
        if not present or record["split"] not in ("train", "eval"):
            raise DataError(f"{where}: every line needs \"split\": \"train\" or \"eval\" once any line has one")
    return [r["split"] for _, r in records]


def split_indices(labels: list[str] | None, n: int, split: Split, eval_fraction: float) -> Sequence[int]:
    """Indices of the n records of `split`: by their split labels when they have them, else the last eval_fraction."""
    if labels is None:
        return heldout_range(n, split, eval_fraction)
    return [i for i, label in enumerate(labels) if split in ("all", label)]


def select_split(records: list[tuple[str, object]], split: Split, eval_fraction: float) -> list[tuple[str, object]]:
    """Records of `split`: by their "split" field when the lines carry one, else the last eval_fraction."""
    return [records[i] for i in split_indices(split_labels(records), len(records), split, eval_fraction)]


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role in {ROLES} and a string content, got {m!r}")
        if not isinstance(m.get("think", ""), str):
            raise DataError(f"{where}: a message's think must be a string, got {m['think']!r}")
    return messages


def _field(record, key: str, where: str):
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    return record[key]


def document_text(record, where: str) -> str:
    """{"text": ...} -> the text followed by </s> (every document ends in </s>)."""
    text = _field(record, "text", where)
    if not isinstance(text, str):
        raise DataError(f"{where}: \"text\" must be a string")
    return text + "</s>"


def conversation_messages(record, where: str) -> list[dict]:
    """{"messages": [...]}, or the bare list of messages (the original's SFT JSONL)."""
    return check_messages(record if isinstance(record, list) else _field(record, "messages", where), where)


def dpo_messages(record, where: str) -> tuple[list[dict], list[dict]]:
    return (check_messages(_field(record, "chosen", where), where),
            check_messages(_field(record, "rejected", where), where))


def grpo_prompt_and_answer(record, where: str) -> tuple[list[dict], str]:
    """The prompt messages (ending with the user turn; the dataset appends <assistant>) and the gold answer string."""
    prompt = check_messages(_field(record, "prompt", where), where)
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: a GRPO prompt ends with the user turn, not an assistant message")
    answer = _field(record, "answer", where)
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise DataError(f"{where}: \"answer\" must be a string or a number")
    return prompt, str(answer)


def encode_records(task: str, records: list[tuple[str, object]], tokenizer) -> dict:
    """Token ids of JSONL records in our formats, per field: pretrain {"text": docs}, sft {None: conversations},
    dpo {"chosen", "rejected"}, grpo {"prompt": token ids, "answer": strings}. Texts are rendered first and encoded in
    one batch call (the tokenizer's fast path); special tokens in the rendered text become their ids."""
    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer.encode_batch(texts) if texts else []

    def template(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False)

    if task == "pretrain":
        return {"text": encode([document_text(r, w) for w, r in records])}
    if task == "sft":
        return {None: encode([template(conversation_messages(r, w)) for w, r in records])}
    if task == "dpo":
        pairs = [dpo_messages(r, w) for w, r in records]
        return {"chosen": encode([template(c) for c, _ in pairs]), "rejected": encode([template(r) for _, r in pairs])}
    if task == "grpo":
        items = [grpo_prompt_and_answer(r, w) for w, r in records]
        return {"prompt": encode([template(p) for p, _ in items]), "answer": [a for _, a in items]}
    raise ValueError(f"unknown task {task!r} (expected one of {TASKS})")


# ----------------------------------------------------------------------------------------------------------------------
# One entry point per task and file

@functools.lru_cache(maxsize=4)
def _encoded_jsonl(task: str, path: Path, size_and_mtime: tuple[int, int] | None, tokenizer) -> tuple:
    """(number of records, their split labels, their token ids: RaggedTokens per field, GRPO answers as strings) of a
    JSONL file, cached by the file's size and mtime: a stage reads its first file three times (counting steps, eval
    split, training) and tokenising is the slow part. The parsed records are not kept."""
    records = read_jsonl(path)
    dtype = token_dtype(tokenizer.vocab_size)
    encoded = encode_records(task, records, tokenizer)
    fields = {k: v if k == "answer" else RaggedTokens.from_sequences(v, dtype) for k, v in encoded.items()}
    return len(records), split_labels(records), fields


def load_dataset(task: str, path: str | Path, tokenizer, max_len: int, split: Split = "all",
                 eval_fraction: float = 0.01) -> Dataset:
    """The dataset of `task` ("pretrain", "sft", "dpo", "grpo") from a .npy, .pkl or .jsonl file.

    max_len is the window length for pretrain and the truncation length for SFT and DPO (unused for GRPO).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of {TASKS})")
    path = Path(path)
    ids = SpecialIds.of(tokenizer)
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    if path.suffix == ".jsonl":
        stat = path.stat() if path.exists() else None  # a missing file: read_jsonl names it
        version = None if stat is None else (stat.st_size, stat.st_mtime_ns)
        n, labels, fields = _encoded_jsonl(task, path.resolve(), version, tokenizer)
        items = split_indices(labels, n, split, eval_fraction)
        if task == "pretrain":
            docs = fields["text"]
            tokens = np.concatenate([docs[i] for i in items]) if len(items) else np.zeros(0, dtype=dtype)
            return PretrainDataset(tokens, max_len, ids.eos)
    elif path.suffix in (".npy", ".pkl"):
        if task == "pretrain":
            tokens = load_stream(path, vocab_size)
            return PretrainDataset(tokens, max_len, ids.eos, heldout_range(len(tokens) // max_len, split, eval_fraction))
        fields = load_collection(path, task, vocab_size)
        items = heldout_range(len(next(iter(fields.values()))), split, eval_fraction)
        if task == "grpo":  # token files store the gold answer as token ids, as the original's grpo.pkl did
            answers = fields["answer"]
            fields["answer"] = [tokenizer.decode(answers[i].tolist()).strip() for i in range(len(answers))]
    else:
        raise TokenFileError(f"{path}: unknown data file type (expected .npy, .pkl or .jsonl)")

    if task == "sft":
        return SFTDataset(fields[None], max_len, ids, items)
    if task == "dpo":
        return DPODataset(fields["chosen"], fields["rejected"], max_len, ids, items)
    return GRPODataset(fields["prompt"], fields["answer"], ids.assistant, items)
