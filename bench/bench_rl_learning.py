"""What the tiny pipeline learns, on CPU with the tiny preset (prints one JSON object).

    OMP_NUM_THREADS=1 python3 bench/bench_rl_learning.py [--run-dir runs/bench_rl] [--from STAGE]

Runs the six tiny stages in order, as utils.py configures them (pretrain_stage0 -> pretrain_stage1 -> cot -> grpo ->
mix -> dpo, each from the one before), with evals only at the start and end of each stage. The stages before --from
(default grpo) are reused from the run dir when complete (--from pretrain_stage0 retrains all); the others are always
trained. After cot, grpo, mix and dpo it measures, with greedy decoding:
- arithmetic: the held-out GRPO prompts (sample_data/grpo.jsonl, split eval; the prompt ends at <assistant>, the model
  decides how to reply, as in GSPO) with a budget of EVAL_NEW_TOKENS: the share of replies that finished (</s>), and
  exact-match accuracy counted on finished replies only (finishing earlier cannot raise it);
- format: each distinct held-out question (the GRPO prompts and the first user turns of mix.jsonl's eval chats) asked
  in think mode (" /think", the prompt ends at <assistant><think>) and in no-think mode (" /no think", it ends at
  <assistant><think> </think>), as the server asks: the share of well-formed replies (trainer.rewards.well_formed);
  and eval.py's format figure (well_formed_*_eval_py): mix's held-out conversations as they are, second turns
  included, with their own switch (harder: most of the tiny model's malformed replies are second turns).
From the stages' own logs: GSPO's held-out reward at its training budget and DPO's held-out preference accuracy.
Each stage's wall and CPU seconds are reported (on a machine shared with other jobs both exceed the idle wall time).
Targets: after dpo >= 95% of think and >= 99% of no-think replies well-formed; GSPO raises the exact-match accuracy on
finished replies; DPO held-out preference accuracy >= 0.85. The JSON is also written to <run dir>/bench_rl_learning.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import eval as eval_report  # noqa: E402
import utils  # noqa: E402
from model import CortexModel, batch_generate, load_weights  # noqa: E402
from trainer.checkpoint import FINAL_WEIGHTS, STAGE_DONE  # noqa: E402
from trainer.cli import build_task  # noqa: E402
from trainer.config import STAGE_ORDER  # noqa: E402
from trainer.data import grpo_prompt_and_answer  # noqa: E402
from trainer.loop import run_stage  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402
from trainer.rewards import answer_closeness, think_and_answer, well_formed  # noqa: E402
from trainer.tokenizer import add_think_switch, get_tokenizer, split_think_switch  # noqa: E402

QUIET = dict(eval_every_steps=0, save_every_steps=10**9)  # evals at the start and the end only, no checkpoints
EVAL_NEW_TOKENS = 128  # above every reply of the SFT data (at most 90 tokens)
BATCH = 64


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def heldout() -> tuple[list[tuple[list[dict], str]], list[str]]:
    """(GRPO prompt messages, gold answer) of the held-out GRPO prompts, and the distinct held-out questions (GRPO
    prompts, then the first user turns of mix's held-out chats, their think switch removed)."""
    grpo = [grpo_prompt_and_answer(r, "grpo.jsonl") for r in read_jsonl(utils.SAMPLE_DATA / "grpo.jsonl")
            if r["split"] == "eval"]
    mix = [next(m["content"] for m in r["messages"] if m["role"] == "user")
           for r in read_jsonl(utils.SAMPLE_DATA / "mix.jsonl") if r["split"] == "eval"]
    questions = [messages[-1]["content"] for messages, _ in grpo] + [split_think_switch(q)[0] for q in mix]
    return grpo, list(dict.fromkeys(questions))  # mix asks some facts in several chats: each question once


def greedy(model, tok, prompts: list[list[int]]) -> list[tuple[str, bool]]:
    """(decoded reply up to and including </s>, finished) per prompt."""
    replies = []
    for i in range(0, len(prompts), BATCH):
        out = batch_generate(model, prompts[i:i + BATCH], max_new_tokens=EVAL_NEW_TOKENS, pad_token_id=tok.pad_id,
                             stop_token_ids=[tok.eos_id], temperature=None)
        for row in out.tolist():
            finished = tok.eos_id in row
            replies.append((tok.decode(row[:row.index(tok.eos_id) + 1] if finished else
                                       [t for t in row if t != tok.pad_id]), finished))
    return replies


@torch.no_grad()
def measure(run: Path, config, grpo, questions) -> dict:
    weights = run / FINAL_WEIGHTS
    tok = get_tokenizer("tiny")
    model = CortexModel(config.model)
    load_weights(model, weights)
    model.eval()
    system = {"role": "system", "content": " "}
    replies = greedy(model, tok, [tok.encode_prompt(messages) for messages, _ in grpo])
    finished = [(text, answer) for (text, done), (_, answer) in zip(replies, grpo) if done]
    exact = sum(answer_closeness(think_and_answer(text)[1], answer) > 0.999 for text, answer in finished)
    result = {"finished": round(len(finished) / len(grpo), 3),
              "exact_of_finished": round(exact / max(1, len(finished)), 3), "exact": exact}
    for thinking, name in ((True, "think"), (False, "no_think")):
        opener = tok.generation_prompt(thinking).removeprefix("<assistant>")
        prompts = [tok.encode_prompt([system, {"role": "user", "content": add_think_switch(q, thinking)}], thinking)
                   for q in questions]
        ok = sum(well_formed(opener + text, thinking) for text, _ in greedy(model, tok, prompts))
        result[f"well_formed_{name}"] = round(ok / len(questions), 3)
    served = eval_report.load_for_serving(run, "tiny", "cpu")
    chats = eval_report.chat_prompts(utils.stage_config("mix", "tiny"), served.tokenizer)
    formats = eval_report.format_section(served, chats, EVAL_NEW_TOKENS, BATCH, 0, eval_report.tqdm(disable=True))
    for name in ("think", "no_think"):
        result[f"well_formed_{name}_eval_py"] = formats[name]["well_formed"]
    return result


def train(stage: str, run_root: Path) -> tuple[Path, float, float]:
    """Trains one stage from the one before; returns its run dir, wall and CPU seconds."""
    config = replace(utils.stage_config(stage, "tiny"), run_root=str(run_root), **QUIET)
    wall, cpu = time.perf_counter(), time.process_time()
    out = run_stage(config, lambda c: build_task(c, utils.data_files(c)))
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bench_rl", help="run root of the stages")
    parser.add_argument("--from", dest="first", choices=STAGE_ORDER, default="grpo",
                        help="the first stage trained again; the ones before are reused when complete")
    args = parser.parse_args()
    torch.manual_seed(0)
    grpo, questions = heldout()
    result = {"heldout_arithmetic_prompts": len(grpo), "heldout_questions_per_mode": len(questions),
              "eval_new_tokens": EVAL_NEW_TOKENS, "stages": {}, "after": {}}
    for stage in STAGE_ORDER:
        if STAGE_ORDER.index(stage) >= STAGE_ORDER.index(args.first):
            shutil.rmtree(args.run_dir / stage, ignore_errors=True)
        reused = (args.run_dir / stage / STAGE_DONE).exists()
        out, wall, cpu = train(stage, args.run_dir)
        steps = read_metrics(out / "metrics.jsonl")
        result["stages"][stage] = {"steps": steps[-1]["step"], "reused": reused, "wall_s": round(wall, 1),
                                   "cpu_s": round(cpu, 1)}
        if stage in ("cot", "grpo", "mix", "dpo"):
            config = utils.stage_config(stage, "tiny")
            result["after"][stage] = measure(out, config, grpo, questions)
        if stage in ("grpo", "dpo"):
            evals = read_metrics(out / "metrics.jsonl", "eval")
            key = "eval_reward" if stage == "grpo" else "eval_reward_accuracy"
            result["stages"][stage] |= {f"heldout_{key[5:]}_before": round(evals[0][key], 3),
                                        f"heldout_{key[5:]}_after": round(evals[-1][key], 3)}
        print(json.dumps({stage: result["stages"][stage], "after": result["after"].get(stage)}), flush=True)
    after = result["after"]
    result["targets"] = {
        "well_formed_think_after_dpo>=0.95": after["dpo"]["well_formed_think"] >= 0.95,
        "well_formed_no_think_after_dpo>=0.99": after["dpo"]["well_formed_no_think"] >= 0.99,
        "eval_py_well_formed_think_after_dpo>=0.95": after["dpo"]["well_formed_think_eval_py"] >= 0.95,
        "eval_py_well_formed_no_think_after_dpo>=0.99": after["dpo"]["well_formed_no_think_eval_py"] >= 0.99,
        "gspo_raises_exact_of_finished": after["grpo"]["exact_of_finished"] > after["cot"]["exact_of_finished"],
        "dpo_heldout_accuracy>=0.85": result["stages"]["dpo"]["heldout_reward_accuracy_after"] >= 0.85}
    trained = [s for s in result["stages"].values() if not s["reused"]]
    result["trained_stages_wall_s"] = round(sum(s["wall_s"] for s in trained), 1)
    result["trained_stages_cpu_s"] = round(sum(s["cpu_s"] for s in trained), 1)
    text = json.dumps(result, indent=2)
    (args.run_dir / "bench_rl_learning.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
