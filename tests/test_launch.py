"""smart_train: launcher choice, argument routing, exit status."""
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.launch import plan_launch, split_args


def test_split_args_routes_launcher_and_script_flags():
    assert split_args(["train_cot.py", "--include", "localhost:1,2"]) == ("train_cot.py", ["--include", "localhost:1,2"], [])
    assert split_args(["train_cot.py", "--num_gpus", "2", "--", "--max-steps", "5"]) == \
        ("train_cot.py", ["--num_gpus", "2"], ["--max-steps", "5"])
    with pytest.raises(SystemExit, match="usage: smart_train"):
        split_args(["--include", "localhost:0"])


def test_deepspeed_launcher_gets_every_launcher_flag():
    plan = plan_launch("train_cot.py", ["--include", "localhost:1,2", "--master_port", "29600"], ["--max-steps", "3"],
                       use_deepspeed=True)
    assert Path(plan.command[0]).name == "deepspeed"
    assert plan.command[1:] == ["--include", "localhost:1,2", "--master_port", "29600", "--module", "--no_local_rank",
                                "trainer.launch", "--run-rank", "train_cot.py", "--max-steps", "3"]


def test_without_deepspeed_gpus_flags_are_translated_for_torchrun_or_python():
    plan = plan_launch("train_cot.py", ["--include", "localhost:0,1"], [], use_deepspeed=False)
    assert plan.command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc_per_node=2" in plan.command and plan.command[-1] == "train_cot.py"
    plan = plan_launch("train_cot.py", ["--num_gpus", "3"], ["--seed", "1"], use_deepspeed=False)
    assert "--nproc_per_node=3" in plan.command and plan.command[-3:] == ["train_cot.py", "--seed", "1"]
    assert plan_launch("train_cot.py", [], ["--seed", "1"], use_deepspeed=False).command == \
        [sys.executable, "train_cot.py", "--seed", "1"]
    with pytest.raises(SystemExit, match="--hostfile"):
        plan_launch("train_cot.py", ["--hostfile", "hosts"], [], use_deepspeed=False)


def test_smart_train_returns_the_child_exit_status(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import sys\nprint('args', sys.argv[1:])\nsys.exit(3)\n")
    result = subprocess.run([sys.executable, "-m", "trainer.launch", str(script), "--", "--flag", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 3
    assert "args ['--flag', 'x']" in result.stdout and "run command:" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "trainer.launch", str(tmp_path / "nope.py")], capture_output=True, text=True)
    assert missing.returncode != 0 and "not found" in missing.stderr


def test_a_torchrun_rank_runs_the_script_like_python_and_keeps_its_exit_status(tmp_path):
    """`python -m trainer.launch --run-rank SCRIPT` (how smart_train starts torchrun ranks) behaves like
    `python SCRIPT`: argv and import path, atexit functions and threads on success, traceback or sys.exit status."""
    (tmp_path / "helper_module.py").write_text("VALUE = 'imported next to the script'\n")
    ok = tmp_path / "ok.py"
    ok.write_text(
        "import atexit, sys, threading, time\n"
        "import helper_module\n"
        "print('argv', sys.argv, helper_module.VALUE)\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread finished', flush=True))).start()\n"
    )
    result = subprocess.run([sys.executable, "-m", "trainer.launch", "--run-rank", str(ok), "--a", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"argv ['{ok}', '--a', '1'] imported next to the script" in result.stdout
    assert "thread finished" in result.stdout and "atexit ran" in result.stdout

    raises = tmp_path / "raises.py"
    raises.write_text("raise RuntimeError('boom')\n")
    result = subprocess.run([sys.executable, "-m", "trainer.launch", "--run-rank", str(raises)], capture_output=True,
                            text=True)
    assert result.returncode == 1 and "RuntimeError: boom" in result.stderr
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(3)\n")
    assert subprocess.run([sys.executable, "-m", "trainer.launch", "--run-rank", str(exits)]).returncode == 3
