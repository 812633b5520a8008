"""Faults around a run: a second run of a live stage, logs after a resume, a tiny held-out split, data errors as one
line, the held-out split of a multi-file stage."""
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import utils
from trainer.checkpoint import FINAL_WEIGHTS, RunDir
from trainer.cli import build_task, run
from trainer.loop import Trainer, run_stage
from trainer.tasks import LanguageModelingTask
from trainer.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny(stage: str, run_root: Path, **changes):
    return replace(utils.stage_config(stage, preset="tiny"), run_root=str(run_root), backend="single", **changes)


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def sample(name: str, n: int) -> list[dict]:
    lines = (utils.SAMPLE_DATA / name).read_text(encoding="utf-8").splitlines()[:n]
    return [{k: v for k, v in json.loads(line).items() if k != "split"} for line in lines]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_live_run_locks_its_run_dir_and_a_second_run_says_who_trains_it(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trainer.checkpoint import RunDir; "
                               "run = RunDir(sys.argv[1], 'cot'); assert run.lock() is None; print('locked', flush=True); "
                               "time.sleep(600)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    config = tiny("cot", tmp_path, init_from=None, max_steps=1)
    run_dir = tmp_path / "cot"
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(SystemExit) as exit_:
            run(config, utils.data_files(config), argv=[])
        assert exit_.value.code == 2
        started = (run_dir / ".lock").read_text().split("(started ")[1].split(")")[0]
        assert capsys.readouterr().err == (
            f"error: {run_dir} is being trained by PID {holder.pid} on {os.uname().nodename} (started {started}); "
            f"wait for it to finish or stop it, then rerun (traceback in {run_dir / 'log.txt'})\n")
        assert not (run_dir / "metrics.jsonl").exists()  # the second run wrote nothing of its own
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the lock with its holder: no stale lock
    again = RunDir(tmp_path, "cot")
    assert again.lock() is None
    again.unlock()


def test_a_data_error_is_one_line_with_the_traceback_in_the_log(tmp_path, capsys):
    bad = jsonl(tmp_path / "bad.jsonl", sample("pretrain.jsonl", 3) + [{"txt": "no text field"}] + sample("pretrain.jsonl", 3))
    config = tiny("pretrain_stage0", tmp_path, data=replace(utils.stage_config("pretrain_stage0", "tiny").data,
                                                            jsonl_files=[str(bad)]))
    with pytest.raises(SystemExit) as exit_:
        run(config, [bad], argv=["--max-steps", "1"])
    assert exit_.value.code == 2
    log = tmp_path / "pretrain_stage0" / "log.txt"
    assert capsys.readouterr().err == f"error: {bad}:4: missing field 'text' (traceback in {log})\n"
    assert "Traceback" in log.read_text() and "DataError" in log.read_text()
    # anything else is not caught: a bug keeps its traceback
    class Unreadable(list):
        def __getitem__(self, index):
            raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run(config, Unreadable([bad]), argv=[])


def test_a_resumed_run_logs_each_step_once(tmp_path):
    config = tiny("pretrain_stage0", tmp_path, max_steps=5, save_every_steps=2, eval_every_steps=2, micro_batch_size=2,
                  grad_accum_steps=1, keep_checkpoints_after_stage=True, data=replace(utils.stage_config("pretrain_stage0", "tiny").data, max_eval_batches=1))
    out = tmp_path / "pretrain_stage0"
    out.mkdir()
    # a lost attempt that died before its first checkpoint: a fresh start drops its records
    jsonl(out / "metrics.jsonl", [{"kind": "eval", "step": 0, "eval_loss": 9.0}, {"kind": "train", "step": 1, "loss": 9.0}])
    train = lambda: run_stage(config, lambda c: build_task(c, utils.data_files(c)))  # noqa: E731
    train()
    first = records(out / "metrics.jsonl")
    first_generations = records(out / "generations.jsonl")

    def check(lines, generations):
        assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4, 5]
        assert [r["step"] for r in lines if r["kind"] == "eval"] == [0, 2, 4, 5]  # 5: the final eval
        assert [g["step"] for g in generations] == [s for s in (2, 4, 5) for _ in utils.TINY_PRETRAIN_PROMPTS]

    check(first, first_generations)

    def kill_before_the_weights():
        for name in (FINAL_WEIGHTS, "stage.json", "model_config.json"):
            (out / name).unlink()

    # killed after the final checkpoint, before the weights: nothing is trained or logged again
    kill_before_the_weights()
    train()
    assert records(out / "metrics.jsonl") == first and records(out / "generations.jsonl") == first_generations

    # killed after step 5 was logged but before its checkpoint, in the middle of writing a record
    kill_before_the_weights()
    (out / "checkpoints" / "step_00000005").rename(out / "checkpoints" / "gone")
    (out / "checkpoints" / "latest").write_text("step_00000004")
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "st')
    train()
    resumed = records(out / "metrics.jsonl")
    check(resumed, records(out / "generations.jsonl"))
    assert resumed[:6] == first[:6]  # the records up to the checkpoint (eval 0, steps 1-4, eval 2) are kept as they were
    assert "resuming at step 4" in (out / "log.txt").read_text()


def test_a_held_out_split_smaller_than_a_micro_batch_is_evaluated(tmp_path):
    small = jsonl(tmp_path / "cot.jsonl", [{**r, "split": "train"} for r in sample("cot.jsonl", 24)]
                  + [{**r, "split": "eval"} for r in sample("cot.jsonl", 27)[24:]])
    config = tiny("cot", tmp_path, init_from=None, micro_batch_size=8,
                  data=replace(utils.stage_config("cot", "tiny").data, jsonl_files=[str(small)]))
    trainer = Trainer(config, lambda c: build_task(c, [small]))
    try:
        held_out = trainer.task.eval_dataset()
        assert len(held_out) == 3
        metrics = trainer.eval_metrics(held_out)
        whole = trainer.task.eval_metrics(held_out.collate([held_out[i] for i in range(3)]), trainer.backend)
        assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] == pytest.approx(float(whole["lm_loss"]))
        # micro-batches of 2: one of 2 items and one of 1, weighted by items
        trainer.config = replace(config, micro_batch_size=2)
        parts = [trainer.task.eval_metrics(held_out.collate([held_out[i] for i in items]), trainer.backend)["lm_loss"]
                 for items in ([0, 1], [2])]
        assert trainer.eval_metrics(held_out)["eval_loss"] == pytest.approx((2 * float(parts[0]) + float(parts[1])) / 3)
    finally:
        trainer.backend.close()


def test_no_held_out_items_means_no_eval_rather_than_nan(tmp_path):
    only_train = jsonl(tmp_path / "cot.jsonl", [{**r, "split": "train"} for r in sample("cot.jsonl", 16)])
    config = tiny("cot", tmp_path, init_from=None, max_steps=1,
                  data=replace(utils.stage_config("cot", "tiny").data, jsonl_files=[str(only_train)]))
    out = run_stage(config, lambda c: build_task(c, [only_train]))
    lines = records(out / "metrics.jsonl")
    assert [r["kind"] for r in lines] == ["train"] and all(not isinstance(v, float) or math.isfinite(v)
                                                           for v in lines[0].values())
    assert "no eval: 0 held-out items for 1 processes" in (out / "log.txt").read_text()


def test_only_the_first_file_of_a_stage_holds_data_out(tmp_path):
    """The eval set is fixed from step 0 and needs no file but the first (files download as training reaches them);
    the other files train in full."""
    files = [jsonl(tmp_path / f"part{i}.jsonl", sample("pretrain.jsonl", 300)[i * 150:(i + 1) * 150]) for i in (0, 1)]
    config = replace(utils.stage_config("pretrain_stage0", "tiny"), run_root=str(tmp_path))
    config = replace(config, data=replace(config.data, jsonl_files=[str(f) for f in files], eval_fraction=0.1))
    task = LanguageModelingTask(config, get_tokenizer(config.tokenizer), files, kind="pretrain")
    whole = [LanguageModelingTask(replace(config, data=replace(config.data, eval_fraction=0.0)), task.tokenizer, [f],
                                  kind="pretrain").train_dataset(0) for f in files]
    assert len(task.train_dataset(1)) == len(whole[1])
    assert 0 < len(task.eval_dataset()) and len(task.train_dataset(0)) < len(whole[0])
