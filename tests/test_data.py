"""Token files (memmapped .npy, restricted .pkl), packing, masking and batch building, against hand examples."""
import json
import pickle

import numpy as np
import pytest
import torch

from trainer.data import (IGNORE_INDEX, DPODataset, GRPODataset, PretrainDataset, SFTDataset, SpecialIds, dpo_batch,
                          heldout_range, load_dataset, mask_prompt, packed_positions_and_mask, read_jsonl,
                          select_split, sft_batch)
from trainer.token_files import (RaggedTokens, TokenFileError, load_collection, load_stream, save_collection,
                                 save_stream, token_dtype)
from trainer.tokenizer import tiny_tokenizer

from conftest import REPO_ROOT

SAMPLE_DATA = REPO_ROOT / "sample_data"
# Hand examples use these ids: </s>=2, <pad>=1, <system>=7, <user>=3, <assistant>=4.
IDS = SpecialIds(eos=2, pad=1, system=7, user=3, assistant=4)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def long(rows):
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------------
# Pretrain packing

def test_packed_positions_and_mask_hand_example():
    #                  a  b  </s> c  </s> d  e  f
    input_ids = long([[5, 6, 2, 8, 2, 9, 10, 11],
                      [5, 6, 7, 8, 9, 10, 11, 12]])  # no </s>: one document
    position_ids, mask = packed_positions_and_mask(input_ids, eos_id=2)
    assert position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))]
    doc = [0, 0, 0, 1, 1, 2, 2, 2]  # each </s> belongs to the document it ends
    expected = [[doc[q] == doc[k] for k in range(8)] for q in range(8)]
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 8, 8)
    assert mask[0, 0].tolist() == expected
    assert mask[1].all()


def test_packed_positions_and_mask_match_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 6, (4, 64), generator=g)  # id 2 (</s>) appears often, also first and last
    position_ids, mask = packed_positions_and_mask(input_ids, eos_id=2)
    for b in range(4):
        pos, doc, p, d = [], [], 0, 0
        for t in range(64):
            pos.append(p)
            doc.append(d)
            p, d = (0, d + 1) if input_ids[b, t] == 2 else (p + 1, d)
        assert position_ids[b].tolist() == pos
        assert mask[b, 0].tolist() == [[doc[q] == doc[k] for k in range(64)] for q in range(64)]


def test_pretrain_windows_are_packed_without_overlap_and_drop_the_tail():
    tokens = np.arange(10, dtype=np.uint16)
    ds = PretrainDataset(tokens, block_size=4, eos_id=2)
    assert len(ds) == 2
    assert ds[0].tolist() == [0, 1, 2, 3] and ds[1].tolist() == [4, 5, 6, 7]  # 8, 9 do not fill a window
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])  # the loss shifts
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert batch["doc_boundary_mask"].shape == (2, 1, 4, 4)
    held_out = PretrainDataset(tokens, 2, 2, heldout_range(5, "eval", 0.2))
    assert [w.tolist() for w in held_out] == [[8, 9]]


# ----------------------------------------------------------------------------------------------------------------------
# SFT / DPO / GRPO

def test_mask_prompt_hand_example_multi_turn_and_truncated_prompt():
    #       <system> ' ' </s> <user> q  q </s> <assistant> a  a </s> <user> q </s> <assistant> a </s>
    row = [7, 10, 2, 3, 11, 12, 2, 4, 13, 14, 2, 3, 15, 2, 4, 16, 2]
    labels = mask_prompt(long([row]), long([row]), IDS)[0].tolist()
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert trained == [7, 8, 9, 10, 14, 15, 16]  # both assistant turns with their tag and </s>
    # truncated inside the second user turn: the unclosed prompt span is masked to the end (the original trained it)
    cut = row[:13]
    labels = mask_prompt(long([cut]), long([cut]), IDS)[0].tolist()
    assert [i for i, label in enumerate(labels) if label != IGNORE_INDEX] == [7, 8, 9, 10]


def test_sft_batch_pads_right_and_masks():
    a, b = [7, 10, 2, 3, 11, 2, 4, 12, 2], [3, 11, 2, 4, 13, 14, 15, 2, 3, 16, 2]
    batch = sft_batch([long(a), long(b)], IDS)
    assert batch["input_ids"].tolist()[0] == a + [IDS.pad] * 2
    assert batch["attention_mask"].tolist() == [[1] * 9 + [0, 0], [1] * 11]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, x, x, x, x, x, 4, 12, 2, x, x], [x, x, x, 4, 13, 14, 15, 2, x, x, x]]


def test_sft_dataset_truncates_counts_and_trains_only_assistant_turns(tok):
    messages = [{"role": "system", "content": " "}, {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "think": "2 + 3 = 5", "content": "5"}, {"role": "user", "content": "和 7?"},
                {"role": "assistant", "think": " ", "content": "12"}]
    short = messages[:3]
    seqs = RaggedTokens.from_sequences([tok.apply_chat_template(m) for m in (messages, short)], token_dtype(2048))
    ds = SFTDataset(seqs, max_len=64, ids=SpecialIds.of(tok))
    assert ds.num_truncated == 0
    batch = ds.collate([ds[0], ds[1]])
    input_ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = tok.decode(input_ids[labels != IGNORE_INDEX].tolist())
    assert trained == ("<assistant><think>2 + 3 = 5</think><answer>5</answer></s>"
                       "<assistant><think> </think><answer>12</answer></s>")
    assert (batch["input_ids"][1][batch["attention_mask"][1] == 0] == tok.pad_id).all()
    cut_len = len(tok.apply_chat_template(short)) + 2  # cut inside the second user turn
    cut = SFTDataset(seqs, max_len=cut_len, ids=SpecialIds.of(tok))
    assert cut.num_truncated == 1 and len(cut[0]) == cut_len
    cut_labels = cut.collate([cut[0]])["labels"][0]
    assert (cut_labels[len(tok.apply_chat_template(short)):] == IGNORE_INDEX).all()


def test_dpo_batch_common_length_and_prompt_masked_on_both_sides():
    chosen, rejected = [7, 10, 2, 3, 11, 2, 4, 12, 13, 2], [7, 10, 2, 3, 11, 2, 4, 14, 2]
    other = ([3, 11, 2, 4, 12, 2], [3, 11, 2, 4, 15, 16, 17, 18, 19, 20, 21, 2])
    batch = dpo_batch([(long(chosen), long(rejected)), tuple(map(long, other))], IDS)
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "labels", "attention_mask")}
    assert all(v.shape == (2, 12) for v in batch.values())
    x = IGNORE_INDEX
    assert batch["chosen_labels"][0].tolist() == [x] * 6 + [4, 12, 13, 2] + [x, x]
    assert batch["rejected_labels"][0].tolist() == [x] * 6 + [4, 14, 2] + [x] * 3
    assert batch["rejected_attention_mask"][1].tolist() == [1] * 12


def test_dpo_dataset_counts_pairs_with_either_side_truncated():
    chosen = RaggedTokens.from_sequences([[3, 2, 4, 5, 2], [3, 2, 4, 2]], np.dtype(np.uint16))
    rejected = RaggedTokens.from_sequences([[3, 2, 4, 2], [3, 2, 4, 5, 6, 7, 2]], np.dtype(np.uint16))
    ds = DPODataset(chosen, rejected, max_len=5, ids=IDS)
    assert ds.num_truncated == 1
    assert [len(s) for s in ds[1]] == [4, 5]


def test_grpo_prompt_gets_assistant_tag_once():
    prompts = RaggedTokens.from_sequences([[7, 10, 2, 3, 11, 2], [3, 11, 2, 4]], np.dtype(np.uint16))
    ds = GRPODataset(prompts, ["42", "3.5"], assistant_id=4)
    assert ds[0]["prompt"].tolist() == [7, 10, 2, 3, 11, 2, 4]
    assert ds[1]["prompt"].tolist() == [3, 11, 2, 4]
    batch = ds.collate([ds[0], ds[1]])
    assert batch["answers"] == ["42", "3.5"] and len(batch["prompts"]) == 2


# ----------------------------------------------------------------------------------------------------------------------
# Token files

def test_token_dtype_by_vocab_size():
    assert token_dtype(46957) == np.uint16 and token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def test_stream_npy_is_memory_mapped_and_checked(tmp_path):
    path = save_stream(tmp_path / "pre.npy", [1, 2, 3, 46956], vocab_size=46957)
    loaded = load_stream(path, 46957)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16 and loaded.tolist() == [1, 2, 3, 46956]
    assert load_stream(save_stream(tmp_path / "big.npy", [70000], vocab_size=80000), 80000).dtype == np.uint32
    with pytest.raises(TokenFileError, match=r"token ids must lie in \[0, 100\)"):
        save_stream(tmp_path / "bad.npy", [5, 100], vocab_size=100)
    assert not (tmp_path / "bad.npy").exists()
    with pytest.raises(TokenFileError, match="missing.npy: file not found"):
        load_stream(tmp_path / "missing.npy", 100)


def test_collections_roundtrip_with_documented_file_names(tmp_path):
    files = save_collection(tmp_path / "dpo.npy", "dpo", {"chosen": [[1, 2], [3]], "rejected": [[4], [5, 6, 7]]}, 100)
    assert sorted(f.name for f in files) == ["dpo.chosen.npy", "dpo.chosen.offsets.npy", "dpo.rejected.npy",
                                             "dpo.rejected.offsets.npy"]
    fields = load_collection(tmp_path / "dpo.npy", "dpo", 100)
    assert [fields["rejected"][i].tolist() for i in range(2)] == [[4], [5, 6, 7]]
    assert isinstance(fields["chosen"].tokens, np.memmap)
    save_collection(tmp_path / "cot_sft.npy", "sft", {None: [[1, 2, 3], [], [4]]}, 100)
    assert (tmp_path / "cot_sft.offsets.npy").exists()
    seqs = load_collection(tmp_path / "cot_sft.npy", "sft", 100)[None]
    assert [seqs[i].tolist() for i in range(3)] == [[1, 2, 3], [], [4]]
    np.save(tmp_path / "cot_sft.offsets.npy", np.array([0, 2, 1, 4]))  # decreasing
    with pytest.raises(TokenFileError, match="cot_sft.offsets.npy: offsets must start at 0, never decrease"):
        load_collection(tmp_path / "cot_sft.npy", "sft", 100)
    np.save(tmp_path / "obj.npy", np.array([[1], "x"], dtype=object), allow_pickle=True)
    with pytest.raises(TokenFileError, match="obj.npy: not a plain numeric .npy file"):
        load_stream(tmp_path / "obj.npy", 100)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def test_original_pickles_load_in_all_four_formats(tmp_path):
    assert load_stream(_dump(tmp_path / "pretrain_short_0.pkl", [5, 6, 2, 7, 2]), 100).tolist() == [5, 6, 2, 7, 2]
    sft = load_collection(_dump(tmp_path / "cot_sft.pkl", [[1, 2], [3, 4, 5]]), "sft", 100)[None]
    assert sft[1].tolist() == [3, 4, 5] and sft.tokens.dtype == np.uint16
    dpo = load_collection(_dump(tmp_path / "dpo.pkl", [{"chosen": [1, 2], "rejected": [1, 3, 3]}]), "dpo", 100)
    assert dpo["chosen"][0].tolist() == [1, 2] and dpo["rejected"][0].tolist() == [1, 3, 3]
    grpo = load_collection(_dump(tmp_path / "grpo.pkl", [{"prompt": [7, 2, 3, 9, 2], "answer": [8]}]), "grpo", 100)
    assert grpo["prompt"][0].tolist() == [7, 2, 3, 9, 2] and grpo["answer"][0].tolist() == [8]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = _dump(tmp_path / "cot_sft.pkl", [[1, 2], _RunsCode(marker)])
    with pytest.raises(TokenFileError, match=r"cot_sft.pkl: refused to unpickle: it references (posix|os)\.system"):
        load_collection(path, "sft", 100)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # what a plain unpickler would have done
    assert marker.exists()


@pytest.mark.parametrize("obj, kind, message", [
    ([1, 2.5, 3], "pretrain", "expected a flat list of integer token ids"),
    ((1, 2, 3), "pretrain", "the top level: expected a list of token ids, got an int"),
    ([[1, "a"]], "sft", "item 0: expected a flat list of integer token ids"),
    ([{"chosen": [1]}], "dpo", r"item 0 must be a dict with exactly the keys \('chosen', 'rejected'\)"),
    ([1, 2, 500], "pretrain", r"token ids must lie in \[0, 100\)"),
])
def test_pickles_of_the_wrong_shape_are_refused(tmp_path, obj, kind, message):
    path = _dump(tmp_path / "x.pkl", obj)
    with pytest.raises(TokenFileError, match=message):
        load_stream(path, 100) if kind == "pretrain" else load_collection(path, kind, 100)


def test_garbage_pickle_is_a_clear_error(tmp_path):
    (tmp_path / "x.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(TokenFileError, match="x.pkl: not a valid token pickle"):
        load_stream(tmp_path / "x.pkl", 100)


# ----------------------------------------------------------------------------------------------------------------------
# Held-out split and loading from every source

def test_heldout_range():
    assert heldout_range(100, "eval", 0.01) == range(99, 100)
    assert heldout_range(100, "train", 0.05) == range(0, 95)
    assert heldout_range(10, "all", 0.5) == range(10)
    assert heldout_range(3, "eval", 0.01) == range(2, 3)  # at least one eval item
    assert heldout_range(1, "train", 0.5) == range(0, 1)  # and never all of them
    with pytest.raises(ValueError, match="split must be"):
        heldout_range(3, "test", 0.1)


def test_select_split_uses_the_split_field(tmp_path):
    lines = [{"text": "a", "split": "train"}, {"text": "b", "split": "eval"}, {"text": "c", "split": "train"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = read_jsonl(tmp_path / "a.jsonl")
    assert [r["text"] for _, r in select_split(records, "eval", 0.5)] == ["b"]
    assert [r["text"] for _, r in select_split(records, "train", 0.5)] == ["a", "c"]
    (tmp_path / "b.jsonl").write_text('{"text": "a", "split": "train"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: every line needs \"split\""):
        select_split(read_jsonl(tmp_path / "b.jsonl"), "train", 0.1)
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="c.jsonl:2: invalid JSON"):
        read_jsonl(tmp_path / "c.jsonl")


def test_sample_data_jsonl_splits_by_field(tok):
    for task, name in (("sft", "cot"), ("dpo", "dpo"), ("grpo", "grpo")):
        splits = [json.loads(line)["split"] for line in (SAMPLE_DATA / f"{name}.jsonl").read_text().splitlines()]
        for split in ("train", "eval"):
            assert len(load_dataset(task, SAMPLE_DATA / f"{name}.jsonl", tok, 512, split)) == splits.count(split)
    pretrain = load_dataset("pretrain", SAMPLE_DATA / "pretrain.jsonl", tok, 128, "train")
    batch = pretrain.collate([pretrain[0], pretrain[1]])
    assert batch["input_ids"].shape == (2, 128) and (batch["input_ids"] == tok.eos_id).any()


def test_jsonl_npy_and_pkl_give_the_same_samples(tok, tmp_path):
    grpo_line = {"prompt": [{"role": "system", "content": " "}, {"role": "user", "content": "3 + 4?"}], "answer": 7}
    sft_line = {"messages": grpo_line["prompt"] + [{"role": "assistant", "think": "3 + 4 = 7", "content": "7"}]}
    (tmp_path / "grpo.jsonl").write_text(json.dumps(grpo_line) + "\n")
    (tmp_path / "sft.jsonl").write_text(json.dumps(sft_line) + "\n")
    prompt = tok.apply_chat_template(grpo_line["prompt"])
    save_collection(tmp_path / "grpo.npy", "grpo", {"prompt": [prompt], "answer": [tok.encode("7")]}, tok.vocab_size)
    _dump(tmp_path / "grpo.pkl", [{"prompt": prompt, "answer": tok.encode("7")}])
    for suffix in ("jsonl", "npy", "pkl"):
        item = load_dataset("grpo", tmp_path / f"grpo.{suffix}", tok, 64)[0]
        assert item["prompt"].tolist() == prompt + [tok.assistant_id] and item["answer"] == "7"
    conversation = tok.apply_chat_template(sft_line["messages"])
    save_collection(tmp_path / "sft.npy", "sft", {None: [conversation]}, tok.vocab_size)
    _dump(tmp_path / "sft.pkl", [conversation])
    for suffix in ("jsonl", "npy", "pkl"):
        assert load_dataset("sft", tmp_path / f"sft.{suffix}", tok, 64)[0].tolist() == conversation


def test_jsonl_is_read_again_once_the_file_changes(tok, tmp_path):
    # load_dataset keeps a file's tokens for the stage's next reads (eval split, training): an edit must invalidate them
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "one two three"}) + "\n" + json.dumps({"text": "four"}) + "\n")
    assert load_dataset("pretrain", path, tok, 2, "train", 0.5).tokens.tolist() == tok.encode("one two three</s>")
    path.write_text(json.dumps({"text": "five six seven eight"}) + "\n" + json.dumps({"text": "four"}) + "\n")
    assert load_dataset("pretrain", path, tok, 2, "train", 0.5).tokens.tolist() == tok.encode("five six seven eight</s>")
    assert load_dataset("pretrain", path, tok, 2, "eval", 0.5).tokens.tolist() == tok.encode("four</s>")
