"""`smart_train`: run a stage script with the right launcher.

    smart_train train_cot.py --include localhost:0,1          # GPUs + DeepSpeed -> deepspeed --include localhost:0,1 train_cot.py
    smart_train train_cot.py --num_gpus 2 -- --max-steps 10    # args after `--` go to the script
    smart_train train_cot.py                                   # no GPU -> python3 train_cot.py

Launcher flags (everything between the script and `--`) go to the launcher: with DeepSpeed usable and GPUs present
that is the `deepspeed` launcher (`--include`, `--exclude`, `--num_gpus`, `--num_nodes`, `--hostfile`, `--master_port`, ...).
Otherwise the DeepSpeed process-count flags are translated for torchrun (several processes, e.g. on CPU with gloo;
torchrun's agent runs inside smart_train) or the script runs as one process. The exit status is the (failed) rank's.

Every launch starts each rank as `python -m trainer.launch --run-rank SCRIPT [script args]` (see run_rank): the rank
runs the script and then ends without the interpreter's final teardown, which could otherwise abort a rank that had
completed its stage. Each rank also dies with smart_train: killed with -9, smart_train forwards nothing, and ranks
left training would share the run dir with a rerun (the run dir's lock then stops the rerun, see trainer/checkpoint.py).
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


RUN_RANK = "--run-rank"
LAUNCHER_ENV = "CORTEX_LAUNCHER"  # host:pid:start time of the smart_train process whose ranks must die with it


@dataclass
class LaunchPlan:
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the child
    torchrun: bool = False  # command is torchrun's: smart_train runs its agent in-process (see run_torchrun)


def split_args(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """`script [launcher args] [-- script args]` -> (script, launcher_args, script_args)."""
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: smart_train SCRIPT.py [launcher args] [-- script args]\n"
                         "e.g.   smart_train train_pretrain_stage0.py --include localhost:0,1")
    script, rest = argv[0], argv[1:]
    if "--" in rest:
        cut = rest.index("--")
        return script, rest[:cut], rest[cut + 1:]
    return script, rest, []


def deepspeed_usable() -> bool:
    """DeepSpeed is installed and there are CUDA GPUs for its launcher to place processes on."""
    return importlib.util.find_spec("deepspeed") is not None and torch.cuda.is_available() and torch.cuda.device_count() > 0


def _parse_ds_flags(launcher_args: list[str]) -> argparse.Namespace:
    """The DeepSpeed launcher flags that decide how many local processes to start (for the torchrun fallback)."""
    parser = argparse.ArgumentParser(prog="smart_train", add_help=False)
    parser.add_argument("--include", default=None)
    parser.add_argument("--num_gpus", "--num-gpus", type=int, default=None)
    parser.add_argument("--nproc_per_node", "--nproc-per-node", type=int, default=None)
    parser.add_argument("--master_port", "--master-port", type=int, default=None)
    flags, unknown = parser.parse_known_args(launcher_args)
    if unknown:
        raise SystemExit(f"smart_train: without DeepSpeed on GPUs only --include, --num_gpus, --nproc_per_node and "
                         f"--master_port can be translated for torchrun; got {' '.join(unknown)}")
    return flags


def _devices_from_include(include: str) -> list[str]:
    """`localhost:0,1` -> ['0', '1'] (one host only in the torchrun fallback)."""
    hosts = include.split("@")
    if len(hosts) != 1 or ":" not in hosts[0]:
        raise SystemExit(f"smart_train: --include {include!r} must look like localhost:0,1 when not using the DeepSpeed launcher")
    return [d for d in hosts[0].split(":", 1)[1].split(",") if d]


def plan_launch(script: str, launcher_args: list[str], script_args: list[str], use_deepspeed: bool) -> LaunchPlan:
    if use_deepspeed:
        deepspeed_bin = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
        # Ranks as `python -u -m trainer.launch --run-rank SCRIPT` (see run_rank); LOCAL_RANK comes in the environment
        return LaunchPlan([deepspeed_bin, *launcher_args, "--module", "--no_local_rank", "trainer.launch", RUN_RANK,
                           script, *script_args])

    flags = _parse_ds_flags(launcher_args)
    env: dict[str, str] = {}
    nproc = flags.nproc_per_node or flags.num_gpus
    if flags.include:
        devices = _devices_from_include(flags.include)
        nproc = nproc or len(devices)
        if torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    if not nproc and torch.cuda.device_count() > 1:
        nproc = torch.cuda.device_count()
    if nproc and nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if flags.master_port:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={flags.master_port}"]
        return LaunchPlan([*cmd, "-m", "trainer.launch", RUN_RANK, script, *script_args], env, torchrun=True)
    return LaunchPlan([sys.executable, "-m", "trainer.launch", RUN_RANK, script, *script_args], env)


def process_start_time(pid: int) -> str | None:
    """When a live process started (clock ticks after boot, from /proc): with the pid it names one process for good,
    as pids are reused. None when it is gone or a zombie (dead, not yet reaped), or without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, *fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return None if state in ("Z", "X") else fields[18]


def launcher_identity() -> str | None:
    start = process_start_time(os.getpid())
    return f"{socket.gethostname()}:{os.getpid()}:{start}" if start else None


def watch_launcher(identity: str, interval_s: float = 0.5) -> None:
    """Kill this process (SIGKILL, as nothing else stops a rank blocked in a collective) once the launcher named by
    identity has died. A background thread polls it: launchers between smart_train and the ranks (torchrun's agent,
    DeepSpeed's runner and launch.py) do not pass on a kill -9 of smart_train, so each rank watches for itself."""
    host, pid, start = identity.rsplit(":", 2)
    if host != socket.gethostname():  # a rank on another node cannot see it
        return

    def watch():
        while process_start_time(int(pid)) == start:
            time.sleep(interval_s)
        print(f"smart_train (PID {pid}) has ended: stopping this rank (PID {os.getpid()})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def run_torchrun(args: list[str]) -> int:
    """torchrun's agent in this process: its ranks are this process's children, and a failed rank ends smart_train
    with that rank's exit status, after the rank's own message (one line for a data error) rather than under
    torchrun's 30-line traceback and report repeating it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"exit status {failure.exitcode}" if failure.exitcode > 0 else f"signal {-failure.exitcode}"
        print(f"smart_train: rank {rank} failed ({how}); its message is above", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return 0


def run_rank(script: str, script_args: list[str]) -> None:
    """One rank of a launch: run the script as `python SCRIPT` would; when it succeeds or calls sys.exit, the process
    then ends as the interpreter ends one (non-daemon threads joined, atexit functions run, output flushed, the exit
    status) minus the final teardown. Under smart_train (LAUNCHER_ENV set) the rank dies with it (watch_launcher).

    Why: the process groups' C++ worker threads (gloo's pt_gloo_runloop) outlive the run: destroy_process_group() does
    not free groups that DeepSpeed (engine, optimizer, every parameter's ds_process_group, caches) and
    torch.distributed.nn still reference. Such a thread frees each finished collective's tensors itself, and when
    Python has dropped a tensor first, it needs the GIL to free the tensor's Python object. During the interpreter's
    teardown Python ends a thread that asks for the GIL with pthread_exit, here inside a noexcept destructor:
    std::terminate ("terminate called without an active exception", SIGABRT) on a rank that had completed its stage.
    Without the teardown there is no race. Every rank has passed its last collective by then (Backend.close ends with
    a barrier), so no peer waits on this one.
    An exception in the script takes the normal way out (traceback, exit status 1)."""
    exit_status = None

    def end_before_teardown():
        if exit_status is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_status)

    if os.environ.get(LAUNCHER_ENV):
        watch_launcher(os.environ[LAUNCHER_ENV])
    atexit.register(end_before_teardown)  # registered first, so it runs after every atexit function the script adds
    sys.argv = [script, *script_args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # its imports resolve as under `python SCRIPT`
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # Python prints a message given as the code; the status is then 1
        exit_status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        raise
    exit_status = 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [RUN_RANK]:
        if len(argv) < 2:
            raise SystemExit(f"usage: python -m trainer.launch {RUN_RANK} SCRIPT.py [script args] "
                             f"(how smart_train starts each rank under torchrun)")
        run_rank(argv[1], argv[2:])
        return 0
    script, launcher_args, script_args = split_args(argv)
    if not os.path.isfile(script):
        raise SystemExit(f"smart_train: script {script!r} not found (run it from the repository root, e.g. "
                         f"`smart_train train_pretrain_stage0.py`)")
    plan = plan_launch(script, launcher_args, script_args, deepspeed_usable())
    print("smart_train: run command:", shlex.join(plan.command), flush=True)
    env = {**plan.env, LAUNCHER_ENV: launcher_identity() or ""}
    if plan.torchrun:
        os.environ.update(env)
        return run_torchrun(plan.command[3:])
    return subprocess.run(plan.command, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main())
