"""One writer per experiment: a second driver is refused with the holder's name, a dead holder's lock is taken over,
and two writers of one experiment never delete each other's rows."""

import json
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from tune_lfm.lock import LOCK_NAME, ExperimentLock, ExperimentLocked, holder_is_gone
from tune_lfm.results import ExperimentRecord

HOLD = """
import sys, time
from tune_lfm.lock import ExperimentLock
with ExperimentLock(sys.argv[1], "python -m tune_lfm.search datasets --name exp", log=print):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture(params=["path", "file-uri"])
def experiment(request, tmp_path):
    directory = tmp_path / "exp"
    return str(directory) if request.param == "path" else f"file://{directory}"


def hold_in_another_process(experiment):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, experiment], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_driver_is_refused_with_the_holders_name(experiment):
    holder = hold_in_another_process(experiment)
    try:
        with pytest.raises(ExperimentLocked) as refused:
            ExperimentLock(experiment, "second").acquire()
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
        assert "--name exp" in message and "choose another --name" in message and "last heartbeat" in message
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_the_search_cli_refuses_a_held_experiment_before_it_starts_ray(tmp_path, resume):
    experiment = tmp_path / "exp"
    space = tmp_path / "seeds.yaml"
    space.write_text("fixed: {dataset: alpaca, max_steps: 20}\nsweep: {seed: {grid: [1, 2]}}\n")
    holder = hold_in_another_process(str(experiment))
    try:
        second = subprocess.run([sys.executable, "-m", "tune_lfm.search", str(space), "--storage", str(tmp_path),
                                 "--name", "exp", "--scale", "tiny", *resume], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by another driver (host {socket.gethostname()}, pid {holder.pid}" in second.stderr
    assert "Traceback" not in second.stderr and "scale:" not in second.stderr  # the line printed once Ray runs


def test_the_lock_of_a_killed_driver_is_taken_over(experiment, capsys):
    holder = hold_in_another_process(experiment)
    holder.kill()  # SIGKILL: no cleanup, the lock file stays behind
    holder.wait()
    path = experiment.removeprefix("file://") + "/" + LOCK_NAME
    assert json.loads(open(path).read())["pid"] == holder.pid
    lines = []
    with ExperimentLock(experiment, "next", log=lines.append):
        assert json.loads(open(path).read())["pid"] == os.getpid()
    assert any("taking over" in line and f"pid {holder.pid}" in line for line in lines)
    assert not os.path.exists(path)  # released at the end


def test_the_heartbeat_is_refreshed_while_held(tmp_path):
    with ExperimentLock(str(tmp_path), "beating", heartbeat_s=0.2):
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.7)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first


def test_a_holder_is_gone_when_its_process_ended_or_it_stopped_beating():
    now = time.time()
    alive = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": now}
    assert not holder_is_gone(alive, stale_after_s=60, now=now)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert holder_is_gone({**alive, "pid": int(finished.stdout)}, stale_after_s=60, now=now)
    elsewhere = {"host": "another-machine", "pid": 1, "heartbeat": now - 30}
    assert not holder_is_gone(elsewhere, stale_after_s=60, now=now)
    assert holder_is_gone(elsewhere, stale_after_s=60, now=now + 100)


def test_two_writers_of_one_experiment_keep_each_others_rows(tmp_path):
    first, second = ExperimentRecord(str(tmp_path)), ExperimentRecord(str(tmp_path))
    first.add_step("a", {"step": 1, "loss": 2.0})
    second.add_step("b", {"step": 1, "loss": 3.0})
    first.set_trial({"trial_id": "a", "status": "completed"})
    second.set_trial({"trial_id": "b", "status": "completed"})
    first.set_trial({"trial_id": "c", "status": "failed"})
    trials = pd.read_parquet(tmp_path / "trials.parquet").set_index("trial_id")
    assert dict(trials["status"]) == {"a": "completed", "b": "completed", "c": "failed"}
    history = pd.read_parquet(tmp_path / "history.parquet")
    assert sorted(history["trial_id"]) == ["a", "b"]


@pytest.fixture
def s3_experiment(monkeypatch):
    """A real S3 endpoint on 127.0.0.1 (moto's server), found by pyarrow through AWS_ENDPOINT_URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="sweeps")
    yield "s3://sweeps/tune-lfm/exp"
    server.stop()


def test_on_object_storage_a_second_driver_is_refused_and_a_silent_holder_is_taken_over(s3_experiment):
    from tune_lfm.results import filesystem

    first = ExperimentLock(s3_experiment, "first", settle_s=0.2, heartbeat_s=60)
    first.acquire()
    try:
        with pytest.raises(ExperimentLocked, match=f"pid {os.getpid()}.*command: first"):
            ExperimentLock(s3_experiment, "second", settle_s=0.2).acquire()
    finally:
        first._stop.set()  # the first driver stops beating without releasing, as if its machine went away
    lines = []
    later = ExperimentLock(s3_experiment, "later", settle_s=0.2, stale_after_s=0.5, log=lines.append)
    first.holder["host"] = "gone-machine"  # so only its heartbeat says whether it lives
    first._write_remote()
    time.sleep(0.6)
    with later:
        fs, path = filesystem(f"{s3_experiment}/{LOCK_NAME}")
        with fs.open_input_stream(path) as stream:
            assert json.loads(stream.read())["command"] == "later"
    assert any("taking over" in line and "gone-machine" in line for line in lines)
    assert later._read() is None  # released


def test_on_object_storage_two_writers_keep_each_others_rows(s3_experiment):
    from tune_lfm.results import read_parquet

    first, second = ExperimentRecord(s3_experiment), ExperimentRecord(s3_experiment)
    first.set_trial({"trial_id": "a", "status": "completed"})
    second.set_trial({"trial_id": "b", "status": "completed"})
    assert sorted(read_parquet(f"{s3_experiment}/trials.parquet")["trial_id"]) == ["a", "b"]
