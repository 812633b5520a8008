"""smart_train: launcher choice, argument routing, exit status, ranks that die with it."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.launch import LAUNCHER_ENV, plan_launch, process_start_time, split_args

REPO = Path(__file__).resolve().parents[1]


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
        [sys.executable, "-m", "trainer.launch", "--run-rank", "train_cot.py", "--seed", "1"]
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


SLEEPER = """import os, sys, time
from pathlib import Path
Path(sys.argv[1], f"rank{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))
time.sleep(600)
"""


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.1)


@pytest.mark.parametrize("launcher_args", [[], ["--num_gpus", "2"]], ids=["one-process", "torchrun"])
def test_ranks_die_with_a_killed_smart_train(tmp_path, launcher_args):
    """kill -9 of smart_train, which nothing can forward: its ranks end too, instead of training on beside a rerun."""
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    nproc = 2 if launcher_args else 1
    launcher = subprocess.Popen([sys.executable, "-m", "trainer.launch", str(script), *launcher_args, "--", str(tmp_path)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pid_files = [tmp_path / f"rank{r}.pid" for r in range(nproc)]
    _wait_for(lambda: all(p.exists() and p.read_text() for p in pid_files) or launcher.poll() is not None, 120,
              "the ranks did not start")
    assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:]
    ranks = [int(p.read_text()) for p in pid_files]
    assert all(process_start_time(pid) for pid in ranks)
    launcher.kill()
    launcher.wait()
    try:
        _wait_for(lambda: not any(process_start_time(pid) for pid in ranks), 20, "a rank outlived smart_train")
    finally:  # a failed test leaves no sleeper behind
        for pid in filter(process_start_time, ranks):
            os.kill(pid, signal.SIGKILL)


def test_a_rank_watches_the_launcher_named_in_its_environment(tmp_path):
    """What the DeepSpeed launcher's ranks rely on (no GPU here to run that launcher): a rank started with
    LAUNCHER_ENV naming a process dies when that process does."""
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    identity = f"{os.uname().nodename}:{stand_in.pid}:{process_start_time(stand_in.pid)}"
    rank = subprocess.Popen([sys.executable, "-m", "trainer.launch", "--run-rank", str(script), str(tmp_path)], cwd=REPO,
                            env={**os.environ, LAUNCHER_ENV: identity}, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / "rank0.pid").exists(), 60, "the rank did not start")
    time.sleep(1)
    assert rank.poll() is None  # alive while the launcher is
    stand_in.send_signal(signal.SIGKILL)  # left unreaped for now: a zombie counts as dead
    try:
        assert rank.wait(timeout=20) == -signal.SIGKILL
    finally:
        rank.kill()
    assert f"smart_train (PID {stand_in.pid}) has ended" in rank.stderr.read()
    stand_in.wait()


def test_torchrun_rank_failure_is_the_ranks_own_message_and_exit_status(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import os, sys\nprint(f\"rank {os.environ['RANK']}: error: bad data\", file=sys.stderr)\n"
                      "sys.exit(2)\n")
    result = subprocess.run([sys.executable, "-m", "trainer.launch", str(script), "--num_gpus", "2"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    failed = [r for r in (0, 1) if f"smart_train: rank {r} failed (exit status 2); its message is above" in result.stderr]
    assert failed and f"rank {failed[0]}: error: bad data" in result.stderr, result.stderr
