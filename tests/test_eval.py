"""eval.py on a tiny checkpoint: the report's files, its numbers against an independent computation, the thinking budget
sweep's limits, and the shared reply-format check."""
import json
import re

import pytest
import torch

import eval as eval_report
from model import CortexModel, tiny_config
from trainer.checkpoint import RunDir
from trainer.rewards import well_formed
from trainer.tasks import LanguageModelingTask, lm_loss, model_inputs
from trainer.tokenizer import tiny_tokenizer

import utils

MAX_NEW = 20


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A random-init tiny model as a finished dpo run dir (trained with the tiny tokenizer), evaluated once."""
    root = tmp_path_factory.mktemp("runs")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(tokenizer.vocab_size, long_context=True)
    RunDir(root, "dpo").write_final(CortexModel(config).state_dict(), config,
                                    {"stage": "dpo", "train_config": {"tokenizer": "tiny"}})
    result = eval_report.main(["--checkpoint", str(root / "dpo"), "--limit", "6", "--max-new-tokens", str(MAX_NEW),
                               "--samples", "2", "--slots", "8"])
    return root / "dpo", result


def test_report_files_and_markdown_agree_with_the_json(report):
    run, result = report
    out = run / "eval"
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "budget_curve.png", "expert_load.png"}
    saved = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert saved["preset"] == "tiny" and saved["stage"] == "dpo" and saved["max_new_tokens"] == MAX_NEW
    assert saved["prompts_too_long"] == 0
    assert f"| {saved['loss']['loss']:.4f} | {saved['loss']['bits_per_byte']:.4f} |" in md
    assert saved["loss"]["stage"] == "mix"  # a dpo checkpoint is scored on the SFT data before it
    fmt = saved["format"]
    assert fmt["think"]["prompts"] + fmt["no_think"]["prompts"] == 6 and fmt["think"]["prompts"] > 0
    for name in ("think", "no_think"):
        assert f"| {fmt[name]['prompts']} | {100 * fmt[name]['well_formed']:.1f}% |" in md
    assert saved["accuracy"]["prompts"] == 6 and saved["accuracy"]["samples_per_prompt"] == 2
    rows = re.findall(r"^\| (unlimited|\d+) \| ", md.split("## Thinking budget")[1].split("## MoE")[0], re.M)
    assert rows == ["0", "8", "16", "unlimited"] == [str(r["budget"]) if r["budget"] is not None else "unlimited"
                                                     for r in saved["budget"]]
    for layer in saved["moe"]["layers"]:
        assert abs(sum(layer["load"]) - 1) < 1e-3 and 0 < layer["entropy"] <= layer["max_entropy"]
        assert layer["dead_experts"] == [e for e, share in enumerate(layer["load"]) if share < 0.01]
    assert len(saved["moe"]["layers"]) == 2  # tiny: layer 0 dense, layers 1-2 MoE


def test_heldout_loss_is_the_trainers_loss_on_the_same_items(report):
    run, result = report
    config = utils.stage_config("mix", "tiny")
    tokenizer = tiny_tokenizer()
    dataset = LanguageModelingTask(config, tokenizer, utils.data_files(config), kind="sft").eval_dataset()
    model = eval_report.load_for_serving(run, "tiny", "cpu").model
    nats, tokens = 0.0, 0
    for start in range(0, result["loss"]["items"], config.micro_batch_size):
        batch = dataset.collate([dataset[i] for i in range(start, min(start + config.micro_batch_size,
                                                                       result["loss"]["items"]))])
        n = int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():  # the token mean the trainer's eval takes per batch, weighted back to token sums
            nats += float(lm_loss(model, model_inputs(batch), batch["labels"])[0]) * n
        tokens += n
    assert result["loss"]["tokens"] == tokens
    assert result["loss"]["loss"] == pytest.approx(nats / tokens, rel=1e-4)


def test_an_int8_model_is_evaluated_too(report, tmp_path):
    run, result = report
    int8 = eval_report.main(["--checkpoint", str(run), "--quantize", "int8", "--sections", "loss", "--limit", "6",
                             "--out", str(tmp_path)])
    assert int8["quantize"] == "int8" and result["quantize"] == "none"
    assert int8["loss"]["tokens"] == result["loss"]["tokens"]  # the same held-out items
    assert abs(int8["loss"]["loss"] - result["loss"]["loss"]) < 0.01 * result["loss"]["loss"]


def test_the_budget_sweep_never_thinks_longer_than_its_budget(report):
    _, result = report
    for row in result["budget"]:
        limit = MAX_NEW if row["budget"] is None else row["budget"]
        assert row["max_thinking_tokens"] <= limit
        assert row["mean_reply_tokens"] <= MAX_NEW
    assert result["budget"][0]["budget"] == 0 and result["budget"][0]["mean_thinking_tokens"] == 0
    # a random model never closes its thought by itself: each budget is used up to the token
    assert [r["max_thinking_tokens"] for r in result["budget"]] == [0, 8, 16, MAX_NEW]
    assert [r["cut_share"] for r in result["budget"]] == [1.0, 1.0, 1.0, 0.0]
    # budgets shorter than the closing sentence end with </think> alone: the whole thought is the model's own
    assert all(r["max_own_thinking_tokens"] == r["max_thinking_tokens"] for r in result["budget"])


def test_a_budget_that_holds_the_closing_sentence_leaves_the_model_the_rest(report):
    served = eval_report.load_for_serving(report[0], "tiny", "cpu")
    prompts = eval_report.arithmetic_prompts(utils.stage_config("grpo", "tiny"), served.tokenizer)[:2]
    english = len(served.tokenizer.encode(eval_report.THINK_BUDGET_CLOSINGS["en"]))  # 42: judged on an empty thought
    [row] = eval_report.budget_section(served, prompts, [english + 4], english + 8, 2, 0, eval_report.tqdm(disable=True))
    assert row["max_thinking_tokens"] == row["mean_thinking_tokens"] == english + 4 and row["cut_share"] == 1.0
    assert row["max_own_thinking_tokens"] == row["mean_own_thinking_tokens"] == 4


def test_bad_input_is_one_clear_error(tmp_path, report):
    with pytest.raises(SystemExit, match="not found"):
        eval_report.main(["--checkpoint", str(tmp_path / "nothing.safetensors")])
    with pytest.raises(SystemExit, match="leaves no room for a prompt in the model's context of 256"):
        eval_report.main(["--checkpoint", str(report[0]), "--max-new-tokens", "250", "--out", str(tmp_path)])


@pytest.mark.parametrize("reply, thinking, expected", [
    ("<think>3 < 4, so</think><answer>4</answer></s>", True, True),
    ("<think> </think><answer>4</answer></s>", False, True),
    ("<think> </think><answer>4</answer></s>", True, False),       # think mode needs a thought
    ("<think>so</think><answer>4</answer></s>", False, False),     # no-think mode needs the empty block
    ("<think>so</think><answer>4</answer>", True, False),          # no </s>: cut off
    ("<think>so</think><answer> </answer></s>", True, False),      # no answer
    ("<think>so</think><answer>4</answer></s>x", True, False),     # something after </s>
    ("<think>a</think>b</think><answer>4</answer></s>", True, False),  # a second </think>
    ("<think>so<answer>4</answer></s>", True, False),              # never closed
    ("<think>so</think><answer>4</answer></s>", None, True),       # None: either mode (the GSPO reward's check)
    ("<think> </think><answer>4</answer></s>", None, True),
    ("<think>so</think><answer>4</answer>", None, False),
])
def test_well_formed(reply, thinking, expected):
    assert well_formed(reply, thinking) is expected
