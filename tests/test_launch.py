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
    assert plan.command[1:] == ["--include", "localhost:1,2", "--master_port", "29600", "train_cot.py", "--max-steps", "3"]


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
