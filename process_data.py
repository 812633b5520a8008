"""Turn raw JSONL into Cortex token files (the memory-mapped .npy format of trainer/token_files.py).

    python3 process_data.py pretrain raw/wiki.jsonl raw/web.jsonl --out data/pretrain.npy
    python3 process_data.py sft raw/cot.jsonl --out data/cot_sft.npy --max-len 2048
    python3 process_data.py sft raw/r1_mix_1024.jsonl --out data/mix_sft.npy --think-switch
    python3 process_data.py dpo raw/dpo_zh.jsonl --out data/dpo.npy
    python3 process_data.py grpo raw/gsm8k_zh.jsonl --out data/grpo.npy
    python3 process_data.py convert data/cot_sft.pkl --task sft --out data/cot_sft.npy   # original .pkl -> .npy

Input lines, per task (our formats, those of sample_data/, plus the raw fields the original pipeline read):
    pretrain  {"text"} | {"completion"} (wikipedia-cn) | {"content"} (code) | {"history", "input", "output"} (deepctrl SFT)
    sft       {"messages": [...]} | a bare list of messages | {"conversations": [...]} (role/content or from/value)
              | {"instruction", ["input"], "output"} | {"query", "response"}
              An assistant content written as <think>T</think>[<answer>]A[</answer>] is split into think and answer.
    dpo       {"chosen": [msgs], "rejected": [msgs]} | LLaMA-Factory {"conversations", "chosen": {value}, "rejected": {value}}
    grpo      {"prompt": [msgs], "answer"} | {"question_zh-cn", "answer_only"} | {"question", "answer"} (GSM8K "#### 42")
Conversations get a system turn " " when they have none, and every assistant turn a think block (" " when it has none),
as in all Cortex chat data. Text cleaning only removes real URLs (a scheme or "www." is required; decimals, file names and
code such as os.path survive) and fills the {{assistant_name}}-style placeholders; brackets are left alone.

Prints one JSON object: how many records were read, kept, truncated and dropped (and why), and the files written.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from trainer.data import TASKS, encode_records, read_jsonl, select_split
from trainer.token_files import (COLLECTION_FIELDS, convert_pickle, load_collection, load_stream, save_collection,
                                 save_stream, token_dtype)
from trainer.tokenizer import TokenizerFilesError, add_think_switch, load_tokenizer, tiny_tokenizer

ASSISTANT_NAME, DEVELOPER_NAME = "Cortex", "QB"
PLACEHOLDERS = {"{{assistant_name}}": ASSISTANT_NAME, "{{NAME}}": ASSISTANT_NAME,
                "{{developer_name}}": DEVELOPER_NAME, "{{AUTHOR}}": DEVELOPER_NAME}
NO_THINK = " "  # the think text of an answer given without thinking

# A URL needs a scheme or "www." (the original's pattern took any dotted run, deleting "3.14" and "os.path" along with
# neighbouring CJK text). It ends at whitespace, quotes, brackets or CJK text, and not on trailing punctuation.
_URL_CHAR = r"[^\s<>\"'`()\[\]{}\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"
URL_PATTERN = re.compile(rf"(?<![A-Za-z0-9])(?:(?:https?|ftp)://|www\.){_URL_CHAR}*(?<![.,;:!?])")
_THINK_PATTERN = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)
_ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def clean_text(text: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return URL_PATTERN.sub("", text)


def split_think_answer(content: str) -> tuple[str | None, str]:
    """"<think>T</think>REST" -> (T, the text inside <answer></answer> in REST, else REST); other text -> (None, text)."""
    match = _THINK_PATTERN.match(content)
    if not match:
        return None, content
    think, rest = match.groups()
    answer = _ANSWER_PATTERN.search(rest)
    return think.strip("\n"), (answer.group(1) if answer else rest).strip("\n")


# ----------------------------------------------------------------------------------------------------------------------
# Raw records -> our formats (trainer/data.py), cleaned

def _message(raw: dict, where: str) -> dict:
    role = _ROLE_NAMES.get(raw.get("role", raw.get("from")))
    content = raw.get("content", raw.get("value"))
    if role is None or not isinstance(content, str):
        raise ValueError(f"{where}: a message needs role (system/user/assistant) or from (human/gpt) and a string "
                         f"content or value, got {raw!r}")
    message = {"role": role, "content": content}
    if "think" in raw:
        if not isinstance(raw["think"], str):
            raise ValueError(f"{where}: a message's think must be a string, got {raw['think']!r}")
        message["think"] = raw["think"]
    elif role == "assistant":
        think, answer = split_think_answer(content)
        if think is not None:
            message = {"role": role, "think": think, "content": answer}
    return message


def _conversation(raw_messages, where: str, think_switch: bool = False) -> list[dict]:
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    messages = []
    for m in raw_messages:
        if not isinstance(m, dict):
            raise ValueError(f"{where}: expected a message object, got {m!r}")
        messages.append(_message(m, where))
    if messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": " "})
    for i, m in enumerate(messages):
        m["content"] = clean_text(m["content"])
        if m["role"] == "assistant":
            m["think"] = clean_text(m["think"]) if m.get("think", "").strip() else NO_THINK
            if think_switch and i > 0 and messages[i - 1]["role"] == "user":
                messages[i - 1]["content"] = add_think_switch(messages[i - 1]["content"], m["think"] != NO_THINK)
    return messages


def _text(raw: dict, key: str, where: str) -> str:
    if not isinstance(raw.get(key), str):
        raise ValueError(f"{where}: \"{key}\" must be a string, got {raw.get(key)!r}")
    return raw[key]


def _keep_split(raw, record: dict) -> dict:
    if isinstance(raw, dict) and "split" in raw:
        record["split"] = raw["split"]
    return record


def normalize_pretrain(raw, where: str) -> dict:
    if isinstance(raw, dict):
        for key in ("text", "completion", "content"):
            if isinstance(raw.get(key), str):
                return _keep_split(raw, {"text": clean_text(raw[key])})
        if isinstance(raw.get("input"), str) and isinstance(raw.get("output"), str):
            turns = [t for pair in raw.get("history") or [] for t in pair] + [raw["input"], raw["output"]]
            if not all(isinstance(t, str) for t in turns):
                raise ValueError(f"{where}: \"history\" must be a list of [question, answer] string pairs")
            return _keep_split(raw, {"text": clean_text("\n".join(turns))})
    raise ValueError(f"{where}: a pretrain line needs \"text\", \"completion\", \"content\" or \"input\"+\"output\"")


def normalize_sft(raw, where: str, think_switch: bool = False) -> dict:
    if isinstance(raw, list):
        return {"messages": _conversation(raw, where, think_switch)}
    if isinstance(raw, dict):
        for key in ("messages", "conversations"):
            if key in raw:
                return _keep_split(raw, {"messages": _conversation(raw[key], where, think_switch)})
        if "instruction" in raw and "output" in raw:
            question = _text(raw, "instruction", where) + (f"\n{_text(raw, 'input', where)}" if raw.get("input") else "")
            turns = [{"role": "user", "content": question}, {"role": "assistant", "content": raw["output"]}]
            return _keep_split(raw, {"messages": _conversation(turns, where, think_switch)})
        if "query" in raw and "response" in raw:
            turns = [{"role": "user", "content": raw["query"]}, {"role": "assistant", "content": raw["response"]}]
            return _keep_split(raw, {"messages": _conversation(turns, where, think_switch)})
    raise ValueError(f"{where}: an sft line needs \"messages\", \"conversations\", \"instruction\"+\"output\" "
                     f"or \"query\"+\"response\" (or is a list of messages)")


def normalize_dpo(raw, where: str) -> dict:
    if isinstance(raw, dict) and isinstance(raw.get("chosen"), list) and isinstance(raw.get("rejected"), list):
        return _keep_split(raw, {"chosen": _conversation(raw["chosen"], where),
                                 "rejected": _conversation(raw["rejected"], where)})
    if isinstance(raw, dict) and isinstance(raw.get("chosen"), dict) and "conversations" in raw:
        # LLaMA-Factory DPO-En-Zh: Cortex trains DPO without thinking, so every user turn gets " /no think".
        sides = {}
        for side in ("chosen", "rejected"):
            answer = raw[side].get("value") if isinstance(raw[side], dict) else None
            messages = _conversation(list(raw["conversations"]) + [{"from": "gpt", "value": answer}], where)
            sides[side] = [dict(m, content=add_think_switch(m["content"], False)) if m["role"] == "user" else m
                           for m in messages]
        return _keep_split(raw, sides)
    raise ValueError(f"{where}: a dpo line needs \"chosen\" and \"rejected\" message lists, or LLaMA-Factory's "
                     f"\"conversations\" + \"chosen\"/\"rejected\" objects")


def normalize_grpo(raw, where: str) -> dict:
    if isinstance(raw, dict):
        if "prompt" in raw and "answer" in raw:
            return _keep_split(raw, {"prompt": _conversation(raw["prompt"], where), "answer": raw["answer"]})
        question = raw.get("question_zh-cn", raw.get("question"))
        answer = raw.get("answer_only", raw.get("answer"))
        if isinstance(question, str) and answer is not None:
            if isinstance(answer, str) and "####" in answer:  # GSM8K: rationale, then "#### 42"
                answer = answer.rsplit("####", 1)[1].strip()
            prompt = _conversation([{"role": "user", "content": question}], where)
            return _keep_split(raw, {"prompt": prompt, "answer": str(answer)})
    raise ValueError(f"{where}: a grpo line needs \"prompt\"+\"answer\", \"question_zh-cn\"+\"answer_only\" "
                     f"or \"question\"+\"answer\"")


def is_empty(task: str, record: dict) -> bool:
    """Nothing left to learn from after cleaning."""
    if task == "pretrain":
        return not record["text"].strip()
    if task == "grpo":
        return not record["prompt"][-1]["content"].strip() or not str(record["answer"]).strip()
    conversations = [record["messages"]] if task == "sft" else [record["chosen"], record["rejected"]]
    return any(not any(m["role"] == "assistant" and m["content"].strip() for m in c) for c in conversations)


# ----------------------------------------------------------------------------------------------------------------------

def encode_compact(task: str, records: list, tokenizer, chunk: int = 10_000) -> dict:
    """encode_records in chunks, each sequence kept as a small numpy array: Python int lists cost ~36 B per token."""
    dtype = token_dtype(tokenizer.vocab_size)
    encoded: dict = {}
    for start in range(0, len(records), chunk):
        for field, values in encode_records(task, records[start:start + chunk], tokenizer).items():
            encoded.setdefault(field, []).extend(values if field == "answer" else
                                                 [np.asarray(v, dtype=dtype) for v in values])
    return encoded if records else encode_records(task, [], tokenizer)


def process(task: str, inputs: list[Path], out: Path, tokenizer, max_len: int = 2048, overlong: str = "drop",
            split: str = "all", seed: int | None = 0, think_switch: bool = False) -> dict:
    """Read, normalise, clean, shuffle (seed None: keep the order), encode, length-check and write; returns the counts."""
    raw = [record for path in inputs for record in read_jsonl(path)]
    normalize = {"pretrain": normalize_pretrain, "sft": lambda r, w: normalize_sft(r, w, think_switch),
                 "dpo": normalize_dpo, "grpo": normalize_grpo}[task]
    records = [(where, normalize(r, where)) for where, r in raw]
    if split != "all" and any("split" not in r for _, r in records):
        raise ValueError(f"--split {split} needs a \"split\" field on every line of {[str(p) for p in inputs]}")
    records = select_split(records, split, eval_fraction=0.0)
    if seed is not None:
        records = [records[i] for i in np.random.default_rng(seed).permutation(len(records))]
    counts = {"task": task, "read": len(raw), "kept": 0, "truncated": 0, "dropped_empty": 0, "dropped_too_long": 0}
    kept = [(w, r) for w, r in records if not is_empty(task, r)]
    counts["dropped_empty"] = len(records) - len(kept)
    encoded = encode_compact(task, kept, tokenizer)

    if task == "pretrain":
        docs = encoded["text"]
        tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=token_dtype(tokenizer.vocab_size))
        files = [save_stream(out, tokens, tokenizer.vocab_size)]
        counts |= {"kept": len(docs), "tokens": int(len(tokens))}
    else:
        length_fields = [f for f in COLLECTION_FIELDS[task] if f != "answer"]  # GRPO: only the prompt is length-checked
        keep_index, truncated = [], 0
        for i in range(len(kept)):
            too_long = any(len(encoded[f][i]) > max_len for f in length_fields)
            if too_long and (overlong == "drop" or task == "grpo"):  # a cut prompt would change the question
                counts["dropped_too_long"] += 1
                continue
            truncated += too_long
            keep_index.append(i)
        fields = {f: [encoded[f][i][:max_len] for i in keep_index] for f in length_fields}
        if task == "grpo":
            fields["answer"] = tokenizer.encode_batch([encoded["answer"][i] for i in keep_index]) if keep_index else []
        files = save_collection(out, task, fields, tokenizer.vocab_size)
        counts |= {"kept": len(keep_index), "truncated": truncated,
                   "tokens": int(sum(len(s) for f in length_fields for s in fields[f]))}
    counts["dropped"] = counts["dropped_empty"] + counts["dropped_too_long"]
    counts["files"] = [str(f) for f in files]
    return counts


def convert(path: Path, task: str, out: Path, vocab_size: int) -> dict:
    """An original .pkl (read opcode by opcode, never unpickled, in flat memory) rewritten as our memory-mappable .npy
    files."""
    files = [str(f) for f in convert_pickle(path, task, vocab_size, out)]
    if task == "pretrain":
        return {"task": task, "kept": 1, "tokens": int(len(load_stream(out, vocab_size))), "files": files}
    fields = load_collection(out, task, vocab_size)
    return {"task": task, "kept": len(next(iter(fields.values()))), "files": files}


def load_cli_tokenizer(name: str | None):
    return tiny_tokenizer() if name == "tiny" else load_tokenizer(name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="process_data.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("task", choices=[*TASKS, "convert"], help="what the input holds; convert: an original .pkl")
    parser.add_argument("inputs", nargs="+", type=Path, help="raw .jsonl files (convert: one .pkl)")
    parser.add_argument("--out", type=Path, required=True, help="output name.npy (see trainer/token_files.py)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: env TOKEN_DIR or ./tokens, the Cortex 2.5 tokenizer); "
                             "'tiny': the tiny preset's BPE tokenizer")
    parser.add_argument("--max-len", type=int, default=2048, help="longest conversation / prompt in tokens")
    parser.add_argument("--overlong", choices=["drop", "truncate"], default="drop",
                        help="sft/dpo items longer than --max-len: drop them (as the original) or cut them")
    parser.add_argument("--split", choices=["all", "train", "eval"], default="all",
                        help="keep only lines with this \"split\" field")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the items / documents")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    parser.add_argument("--think-switch", action="store_true",
                        help="sft: end each user turn with ' /think' or ' /no think' by whether its answer thinks (mix SFT)")
    parser.add_argument("--task", dest="convert_task", choices=TASKS, help="convert: what the .pkl holds")
    parser.add_argument("--vocab-size", type=int, default=46957, help="convert: vocabulary size (Cortex 2.5: 46957)")
    args = parser.parse_args(argv)
    try:
        if args.task == "convert":
            if args.convert_task is None or len(args.inputs) != 1:
                parser.error("convert takes one .pkl file and --task")
            counts = convert(args.inputs[0], args.convert_task, args.out, args.vocab_size)
        else:
            counts = process(args.task, args.inputs, args.out, load_cli_tokenizer(args.tokenizer), args.max_len,
                             args.overlong, args.split, None if args.no_shuffle else args.seed, args.think_switch)
    except (ValueError, FileNotFoundError, TokenizerFilesError) as e:  # TokenFileError is a ValueError
        sys.exit(f"error: {e}")
    print(json.dumps(counts, ensure_ascii=False))
    return counts


if __name__ == "__main__":
    main()
