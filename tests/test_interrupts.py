"""A sweep stopped by Ctrl-C or SIGTERM says so, keeps what finished and prints the command that resumes it, which
keeps the finished trials and can itself be stopped. (A resumed sweep that runs to the end, each step once:
test_s3_storage.py; a second driver on a held experiment is refused: test_lock.py.)"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
SPACE = ("fixed: {dataset: alpaca, max_steps: 20, num_examples: 320, lora_targets: o_proj}\n"
         "sweep: {seed: {grid: [1, 2, 3, 4, 5]}}\nresources: {max_concurrent: 1}\n")


def start(command: list[str], log):
    return subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, driver, timeout=400):
    deadline = time.time() + timeout
    while not condition():
        assert driver.poll() is None, "the driver ended before the condition held"
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)


def finished_rows(trials_file) -> int:
    return len(pd.read_parquet(trials_file)) if trials_file.exists() else 0


def test_interrupted_sweep_reports_and_resumes(tmp_path):
    space = tmp_path / "seeds.yaml"
    space.write_text(SPACE)
    trials_file = tmp_path / "exp" / "trials.parquet"
    command = [sys.executable, "-m", "tune_lfm.search", str(space), "--storage", str(tmp_path), "--name", "exp",
               "--scale", "tiny"]
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        first = start(command, sink)
    try:
        wait_for(lambda: finished_rows(trials_file) >= 1, first)
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in the terminal: the driver's whole process group
        assert first.wait(timeout=300) == 130, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    output = log.read_text()
    finished = pd.read_parquet(trials_file)
    done = len(finished)
    assert re.search(rf"interrupted: {done} of 5 finished", output), output[-3000:]
    assert "finished: " not in output and 1 <= done < 5
    resume = re.search(r"resume: (.*)", output).group(1)
    assert shlex.split(resume)[:3] == ["python", "-m", "tune_lfm.search"] and resume.endswith("--name exp --resume")

    log = tmp_path / "second.log"
    with open(log, "w") as sink:
        again = start([sys.executable, *shlex.split(resume)[1:]], sink)
    try:
        wait_for(lambda: "experiment: " in log.read_text(), again)
        time.sleep(3)
        os.kill(again.pid, signal.SIGTERM)  # as a job scheduler or `kill` stops it
        assert again.wait(timeout=300) == 143, log.read_text()[-3000:]
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
    output = log.read_text()
    assert f"resuming {tmp_path}/exp: {done} finished trials are kept and not run again" in output, output[-3000:]
    assert re.search(r"interrupted: \d of 5 finished", output)
    kept = pd.read_parquet(trials_file).set_index("trial_id")
    assert set(kept["status"]) == {"completed"}  # trials stopped by the interrupt are not recorded as failed
    assert set(finished["trial_id"]) <= set(kept.index)
    for row in finished.itertuples():
        assert kept.loc[row.trial_id, "finished_at"] == row.finished_at  # finished trials were not run again
