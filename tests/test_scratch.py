"""A killed trial process leaves its scratch directories (adapter, trainer checkpoints) behind; the next process on
the machine that makes one removes them, never those of a process still running."""

import os
import socket
import subprocess
import sys
from pathlib import Path

HOLD = ("import time\nfrom tune_lfm.scratch import scratch_dir\nheld = scratch_dir('tune_lfm_adapter_')\n"
        "print(held.name, flush=True)\ntime.sleep(600)\n")
MAKE = "from tune_lfm.scratch import scratch_dir\nwith scratch_dir('tune_lfm_trial_') as made:\n    print(made)\n"


def test_the_scratch_of_a_killed_process_goes_when_the_next_one_makes_its_own(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killed, running = (subprocess.Popen([sys.executable, "-c", HOLD], env=env, stdout=subprocess.PIPE, text=True)
                       for _ in range(2))
    try:
        left, kept = Path(killed.stdout.readline().strip()), Path(running.stdout.readline().strip())
        assert left.parent.name == f"tune_lfm_scratch_{socket.gethostname()}_{killed.pid}" and left.is_dir()
        killed.kill()
        killed.wait(timeout=30)
        assert left.is_dir()  # SIGKILL: nothing in the process could remove it

        made = subprocess.run([sys.executable, "-c", MAKE], env=env, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        assert Path(made.stdout.strip()).parent.parent == tmp_path
        assert not left.parent.exists()  # the killed process's directory went with its contents
        assert kept.is_dir()  # a running process keeps its own
        assert sorted(p.name for p in tmp_path.iterdir()) == [kept.parent.name]  # the last one removed its own at exit
    finally:
        running.kill()
        killed.kill()
