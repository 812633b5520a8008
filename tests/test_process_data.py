"""process_data.py: raw JSONL (our formats and the original's raw fields) -> token files, with counts."""
import json
import pickle
import runpy
import sys

import numpy as np
import pytest

import process_data
from process_data import clean_text, normalize_dpo, normalize_grpo, normalize_pretrain, normalize_sft, split_think_answer
from trainer.data import IGNORE_INDEX, load_dataset
from trainer.token_files import load_collection, load_stream
from trainer.tokenizer import tiny_tokenizer

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return path


def run(tok, capsys, *args):
    counts = process_data.main([*map(str, args), "--tokenizer", str(tok.token_dir)])
    assert json.loads(capsys.readouterr().out) == counts  # the printed JSON is the counts
    return counts


def test_help_works(monkeypatch, capsys):
    # the script as `python3 process_data.py --help` runs it, in this process (a new one spends seconds importing torch)
    monkeypatch.setattr(sys, "argv", ["process_data.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO_ROOT / "process_data.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "pretrain,sft,dpo,grpo,convert" in out and "--max-len" in out


@pytest.mark.parametrize("text", ["答案是3.14元", "import os.path", "总价为12.50美元。", "print()", "e.g. v1.2.3 and a.b.c",
                                  "见【注】（无）《书》", "file.txt"])
def test_cleaning_keeps_decimals_code_and_brackets(text):
    assert clean_text(text) == text


def test_cleaning_removes_real_urls_and_fills_placeholders():
    assert clean_text("see https://example.com/a?b=1&c=2. Then") == "see . Then"
    assert clean_text("访问www.baidu.com了解，或http://x.cn/p。") == "访问了解，或。"
    assert clean_text("(ftp://host/file)") == "()"
    assert clean_text("我是{{assistant_name}}，由{{developer_name}}开发") == "我是Cortex，由QB开发"


def test_split_think_answer():
    assert split_think_answer("<think>\nT\n</think>\n<answer>\nA\n</answer>") == ("T", "A")
    assert split_think_answer("<think>T</think>A") == ("T", "A")
    assert split_think_answer("plain answer about thinking") == (None, "plain answer about thinking")


def test_normalize_original_raw_fields():
    assert normalize_pretrain({"history": [["q1", "a1"]], "input": "q2", "output": "a2"}, "x") == {"text": "q1\na1\nq2\na2"}
    assert normalize_pretrain({"completion": "维基"}, "x") == {"text": "维基"}
    mix = normalize_sft({"conversations": [
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n<answer>\n2\n</answer>"},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello, I think so"}]}, "x", think_switch=True)
    assert mix["messages"] == [
        {"role": "system", "content": " "},
        {"role": "user", "content": "1+1? /think"}, {"role": "assistant", "think": "1+1=2", "content": "2"},
        # the word "think" in an answer does not make it a thinking turn (the original's substring test did)
        {"role": "user", "content": "hi /no think"}, {"role": "assistant", "content": "hello, I think so", "think": " "}]
    cot = normalize_sft({"instruction": "Q", "input": "ctx", "output": "<think>T</think>A"}, "x")
    assert cot["messages"][1:] == [{"role": "user", "content": "Q\nctx"},
                                   {"role": "assistant", "think": "T", "content": "A"}]
    dpo = normalize_dpo({"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"},
                         "rejected": {"from": "gpt", "value": "bad"}}, "x")
    assert dpo["chosen"] == [{"role": "system", "content": " "}, {"role": "user", "content": "Q /no think"},
                             {"role": "assistant", "content": "good", "think": " "}]
    assert dpo["rejected"][-1]["content"] == "bad"
    assert normalize_grpo({"question_zh-cn": "问题", "answer_only": 12}, "x")["answer"] == "12"
    assert normalize_grpo({"question": "Q", "answer": "so 6 * 7\n#### 42"}, "x")["answer"] == "42"
    with pytest.raises(ValueError, match="f.jsonl:3: an sft line needs"):
        normalize_sft({"foo": 1}, "f.jsonl:3")


def test_pretrain_stream_with_counts(tok, tmp_path, capsys):
    docs = ["答案是3.14元。", "import os.path", "https://only-a-url.example.com", "第二篇"]
    src = write_jsonl(tmp_path / "raw.jsonl", [{"text": d} for d in docs])
    counts = run(tok, capsys, "pretrain", src, "--out", tmp_path / "pre.npy", "--no-shuffle")
    assert counts["read"] == 4 and counts["kept"] == 3 and counts["dropped_empty"] == 1 and counts["dropped"] == 1
    stream = load_stream(tmp_path / "pre.npy", tok.vocab_size)
    expected = [t for d in (docs[0], docs[1], docs[3]) for t in tok.encode(d) + [tok.eos_id]]
    assert stream.tolist() == expected and counts["tokens"] == len(expected)
    assert stream.dtype == np.uint16
    counts = run(tok, capsys, "pretrain", src, "--out", tmp_path / "shuffled.npy", "--seed", "3")
    shuffled = load_stream(tmp_path / "shuffled.npy", tok.vocab_size)
    assert sorted(shuffled.tolist()) == sorted(expected)  # same documents, shuffled deterministically
    run(tok, capsys, "pretrain", src, "--out", tmp_path / "again.npy", "--seed", "3")
    assert (tmp_path / "again.npy").read_bytes() == (tmp_path / "shuffled.npy").read_bytes()


def test_sft_drop_or_truncate_overlong(tok, tmp_path, capsys):
    short = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    long_ = {"messages": [{"role": "user", "content": "很长的问题" * 20}, {"role": "assistant", "content": "好"}]}
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "www.example.com"}]}
    src = write_jsonl(tmp_path / "raw.jsonl", [short, long_, empty])
    max_len = len(tok.apply_chat_template(normalize_sft(short, "x")["messages"]))
    counts = run(tok, capsys, "sft", src, "--out", tmp_path / "drop.npy", "--max-len", max_len, "--no-shuffle")
    assert (counts["kept"], counts["truncated"], counts["dropped_too_long"], counts["dropped_empty"]) == (1, 0, 1, 1)
    counts = run(tok, capsys, "sft", src, "--out", tmp_path / "cut.npy", "--max-len", max_len, "--no-shuffle",
                 "--overlong", "truncate")
    assert (counts["kept"], counts["truncated"], counts["dropped"]) == (2, 1, 1)
    seqs = load_collection(tmp_path / "cut.npy", "sft", tok.vocab_size)[None]
    assert seqs.lengths().tolist() == [max_len, max_len]
    ds = load_dataset("sft", tmp_path / "cut.npy", tok, 4096)
    batch = ds.collate([ds[0]])
    trained = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert tok.decode(trained) == "<assistant><think> </think><answer>2</answer></s>"


def test_sample_data_split_dpo_and_grpo(tok, tmp_path, capsys):
    lines = (REPO_ROOT / "sample_data" / "dpo.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    src = tmp_path / "dpo.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    n_eval = sum(json.loads(line)["split"] == "eval" for line in lines)
    counts = run(tok, capsys, "dpo", src, "--out", tmp_path / "dpo.npy", "--split", "eval")
    assert counts["kept"] == n_eval and counts["read"] == 40
    assert len(load_dataset("dpo", tmp_path / "dpo.npy", tok, 2048)) == n_eval
    assert sorted(p.name for p in tmp_path.glob("dpo.*.npy")) == ["dpo.chosen.npy", "dpo.chosen.offsets.npy",
                                                                   "dpo.rejected.npy", "dpo.rejected.offsets.npy"]
    src = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question_zh-cn": "3加4等于几？", "answer_only": 7}])
    run(tok, capsys, "grpo", src, "--out", tmp_path / "grpo.npy")
    item = load_dataset("grpo", tmp_path / "grpo.npy", tok, 2048)[0]
    assert item["answer"] == "7"
    assert tok.decode(item["prompt"].tolist()) == "<system> </s><user>3加4等于几？</s><assistant>"
    with pytest.raises(SystemExit, match="--split train needs a \"split\" field"):
        process_data.main(["grpo", str(src), "--out", str(tmp_path / "g.npy"), "--split", "train",
                           "--tokenizer", str(tok.token_dir)])


def test_bad_input_is_a_clear_error(tok, tmp_path):
    src = write_jsonl(tmp_path / "raw.jsonl", [{"text": "ok"}, {"nothing": 1}])
    with pytest.raises(SystemExit, match=r"raw.jsonl:2: a pretrain line needs"):
        process_data.main(["pretrain", str(src), "--out", str(tmp_path / "x.npy"), "--tokenizer", str(tok.token_dir)])
    assert not (tmp_path / "x.npy").exists()


def test_convert_original_pickle(tmp_path, capsys):
    with open(tmp_path / "grpo.pkl", "wb") as f:
        pickle.dump([{"prompt": [46951, 333, 2], "answer": [22]}], f)
    counts = process_data.main(["convert", str(tmp_path / "grpo.pkl"), "--task", "grpo", "--out", str(tmp_path / "grpo.npy")])
    assert counts["kept"] == 1 and len(counts["files"]) == 4
    fields = load_collection(tmp_path / "grpo.npy", "grpo", 46957)
    assert fields["prompt"][0].tolist() == [46951, 333, 2] and fields["prompt"].tokens.dtype == np.uint16


def test_convert_refuses_a_pickle_of_another_vocabulary_and_writes_nothing(tmp_path):
    with open(tmp_path / "pretrain_short_0.pkl", "wb") as f:
        pickle.dump([5, 6, 50000, 2], f)
    with pytest.raises(SystemExit, match=r"pretrain_short_0\.pkl: token 2: token ids must lie in \[0, 46957\), got 50000"):
        process_data.main(["convert", str(tmp_path / "pretrain_short_0.pkl"), "--task", "pretrain",
                           "--out", str(tmp_path / "pretrain_short_0.npy")])
    assert [p.name for p in tmp_path.iterdir()] == ["pretrain_short_0.pkl"]
    counts = process_data.main(["convert", str(tmp_path / "pretrain_short_0.pkl"), "--task", "pretrain",
                                "--out", str(tmp_path / "pretrain_short_0.npy"), "--vocab-size", "65536"])
    assert counts["tokens"] == 4 and np.load(tmp_path / "pretrain_short_0.npy").dtype == np.uint32


def test_our_format_passes_through_unchanged(tok, tmp_path, capsys):
    """Sample-data lines are already normalised: process_data gives exactly what loading the JSONL gives."""
    src = REPO_ROOT / "sample_data" / "mix.jsonl"
    run(tok, capsys, "sft", src, "--out", tmp_path / "mix_sft.npy", "--think-switch", "--no-shuffle")
    from_jsonl, from_npy = (load_dataset("sft", p, tok, 4096) for p in (src, tmp_path / "mix_sft.npy"))
    assert len(from_jsonl) == len(from_npy) == 1500
    assert all(from_jsonl[i].tolist() == from_npy[i].tolist() for i in range(1500))
