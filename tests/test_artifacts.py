"""A trial whose worker is killed mid-way goes on from its checkpoint with each step once, in a two-trial Optuna
search whose study holds trials.parquet's numbers under named objectives; bad artifact and tracker settings are
refused. What the quickstart's sweep leaves (adapters, exports, tracker runs): test_quickstart.py."""

import glob
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from cli import ENV, run_module
from ray_results import resume_checkpoint_held

pytestmark = pytest.mark.slow


def test_bad_tracker_or_artifact_setting_exits_2_naming_it(tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text("fixed: {dataset: alpaca}\nartifacts: {keep_adapters: some}\n")
    out = run_module("tune_lfm.search", space, "--dry-run", "--scale", "tiny", timeout=120)
    assert out.returncode == 2 and "artifacts" in out.stderr and "keep_adapters" in out.stderr
    assert "all, pareto, none" in out.stderr and "Traceback" not in out.stderr
    out = run_module("tune_lfm.search", "optimizers", "--log", "comet", "--dry-run", timeout=120)
    assert out.returncode == 2 and "--log" in out.stderr and "mlflow" in out.stderr


# ---------------------------------------------------------------- a trial killed mid-way, in an Optuna search
# (two objectives, NSGA-II: the study stored beside the dataframes holds them, named, with trials.parquet's values)

RESUME_SWEEP = """
fixed: {dataset: alpaca, num_examples: 32, eval_examples: 4, max_length: 128, max_steps: 16, batch_size: 2,
        grad_accum: 1}
sweep:
  learning_rate: {loguniform: [1.0e-4, 1.0e-3]}
search: {algorithm: optuna, sampler: nsga2, num_samples: 2, seed: 3, objectives: {train_loss: min, kl: min}}
artifacts: {checkpoint_every_steps: 4}
resources: {cpus_per_trial: 1, max_concurrent: 1}  # full scale would give 2 torch threads, which spin on a busy core
max_failures: 1
"""


def trial_workers(driver_pid: int) -> list:
    """The Ray worker processes running trials, among this driver's own descendants (never another user's)."""
    import psutil

    workers = []
    for process in psutil.Process(driver_pid).children(recursive=True):
        try:
            if process.cmdline()[:1] == ["ray::ImplicitFunc.train"]:
                workers.append(process)
        except psutil.Error:
            continue
    return workers


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A two-trial Optuna search, one trial at a time, whose first trial's worker process is SIGKILLed once the driver
    holds a resume checkpoint (every 4 of its 16 steps)."""
    root = tmp_path_factory.mktemp("resume")
    (root / "resume.yaml").write_text(RESUME_SWEEP)
    log = open(root / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "tune_lfm.search", str(root / "resume.yaml"), "--storage",
                               str(root), "--name", "exp", "--scale", "full", "--set", "model=tiny-lfm2", "--set",
                               "data_source=embedded"], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline and not resume_checkpoint_held(root / "exp"):
        time.sleep(0.05)
    workers = trial_workers(driver.pid)
    [worker] = workers
    worker.kill()
    assert driver.wait(timeout=900) == 0, (root / "driver.log").read_text()[-3000:]
    return root / "exp", (root / "driver.log").read_text()


def test_killed_trial_resumes_from_its_checkpoint_with_each_step_once(killed):
    from tune_lfm.config import config_from_dict
    from tune_lfm.trial import run_trial

    directory, driver_log = killed
    trials = pd.read_parquet(directory / "trials.parquet")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"} and sorted(trials["attempts"]) == [1, 2]
    [first] = [row for _, row in trials.iterrows() if row["attempts"] == 2]
    history = pd.read_parquet(directory / "history.parquet")
    assert first["steps_completed"] == 16
    assert first["resumed_from_step"] in (4, 8, 12)  # the last checkpoint Ray held when the worker died
    assert f"resuming from the checkpoint of step {first['resumed_from_step']:.0f}" in driver_log
    assert sorted(history[history["trial_id"] == first["trial_id"]]["step"]) == list(range(1, 17))
    # the resume checkpoints gave way to the adapter
    [adapter] = glob.glob(str(directory / f"{first['trial_id']}-*" / "checkpoint_*"))
    assert adapter == first["adapter_uri"]

    described = json.loads((Path(first["adapter_uri"]) / "tune_lfm_trial.json").read_text())
    uninterrupted = run_trial(config_from_dict(described["config"]), log=lambda line: None)
    resumed = history[history["trial_id"] == first["trial_id"]].sort_values("step")
    assert list(resumed["loss"]) == pytest.approx([row["loss"] for row in uninterrupted["history"]], rel=1e-4)
    for metric in ("train_loss", "eval_loss", "kl", "tokens_trained"):
        assert first[metric] == pytest.approx(uninterrupted[metric], rel=1e-3), metric


def test_optuna_dashboard_shows_named_objectives_and_the_dataframe_values(killed):
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from optuna_dashboard import wsgi

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    directory, _ = killed
    server = make_server("127.0.0.1", 0, wsgi(f"sqlite:///{directory}/optuna.db"), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/api/studies"
    try:
        [study] = json.load(urllib.request.urlopen(base))["study_summaries"]
        detail = json.load(urllib.request.urlopen(f"{base}/{study['study_id']}?after=0"))
    finally:
        server.shutdown()
    assert detail["objective_names"] == ["train_loss", "kl"]
    trials = pd.read_parquet(directory / "trials.parquet").set_index("trial_id")
    assert len(detail["trials"]) == len(trials) == 2
    for shown in detail["trials"]:
        attrs = {a["key"]: a["value"] for a in shown["user_attrs"]}
        row = trials.loc[attrs["trial_id"]]
        assert shown["state"] == "Complete"
        assert shown["values"] == pytest.approx([row["train_loss"], row["kl"]], rel=1e-12)
        assert json.loads(attrs["config"])["learning_rate"] == pytest.approx(row["learning_rate"], rel=1e-12)
