"""The real CLI on local Ray at tiny scale: sweeps land in parquet, faults are recorded, Optuna and resume work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}


def search(*args, timeout=900, **kwargs):
    return subprocess.run([sys.executable, "-m", "tune_lfm.search", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kwargs)


def test_datasets_sweep_end_to_end_writes_both_dataframes(tmp_path):
    out = search("datasets", "--storage", tmp_path, "--name", "exp")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scale: TINY" in out.stderr
    trials = pd.read_parquet(tmp_path / "exp" / "trials.parquet")
    assert len(trials) == 10 and set(trials["status"]) == {"completed"}, trials[["dataset", "status", "error"]]
    assert sorted(trials["dataset"]) == sorted(["smol-magpie-ultra", "ultrachat", "finetome", "magicoder", "tulu3",
                                                 "openhermes", "slimorca", "gsm8k", "dolly", "alpaca"])
    for column in ("train_loss", "eval_loss", "base_loss", "kl", "tokens_per_s", "wall_s", "trainable_params"):
        assert trials[column].notna().all(), column
    assert (trials["scale"] == "tiny").all() and (trials["sweep"] == "datasets").all()
    history = pd.read_parquet(tmp_path / "exp" / "history.parquet")
    assert set(history["trial_id"]) == set(trials["trial_id"])
    assert (history.groupby("trial_id")["step"].max() == 20).all()

    import duckdb
    import polars as pl

    assert pl.read_parquet(tmp_path / "exp" / "trials.parquet").height == 10
    uri = str(tmp_path / "exp" / "trials.parquet")
    assert duckdb.sql(f"select count(*) from '{uri}' where status = 'completed'").fetchall()[0][0] == 10


def test_failures_and_divergence_are_recorded_while_the_sweep_completes(tmp_path):
    space = tmp_path / "faults.yaml"
    space.write_text(f"""
fixed: {{max_steps: 60, num_examples: 640}}
user_datasets:
  missing-file: {{path: {tmp_path}/nowhere.jsonl, format: alpaca}}
sweep:
  variants:
    grid:
      - {{dataset: alpaca}}
      - {{dataset: missing-file, data_source: hub}}
      - {{dataset: dolly, learning_rate: .inf}}
max_failures: 0
""")
    out = search(space, "--storage", tmp_path, "--name", "faults", "--scale", "tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "faults" / "trials.parquet").set_index("dataset")
    assert trials.loc["alpaca", "status"] == "completed"
    assert trials.loc["missing-file", "status"] == "failed"
    assert "nowhere.jsonl" in trials.loc["missing-file", "error"]
    assert trials.loc["dolly", "status"] == "diverged" and "non-finite" in trials.loc["dolly", "error"]
    diverged = json.loads((Path(trials.loc["dolly", "adapter_uri"]) / "tune_lfm_trial.json").read_text())
    assert diverged["status"] == "diverged"  # its adapter is kept too, marked
    assert pd.isna(trials.loc["missing-file", "adapter_uri"])


def test_optuna_two_objective_search_stores_its_study(tmp_path):
    space = tmp_path / "mo.yaml"
    space.write_text("""
fixed: {dataset: alpaca, max_steps: 60, num_examples: 640}
sweep:
  learning_rate: {loguniform: [1.0e-4, 3.0e-3]}
  lora_targets: {choice: [hub_oproj, all_linear]}
search: {algorithm: optuna, sampler: nsga2, num_samples: 3, seed: 1, objectives: {train_loss: min, kl: min}}
""")
    out = search(space, "--storage", tmp_path, "--name", "mo", "--scale", "tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "mo" / "trials.parquet")
    assert len(trials) == 3 and set(trials["status"]) == {"completed"}

    import optuna

    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{tmp_path}/mo/optuna.db")
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 3 and all(len(t.values) == 2 for t in finished)


def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    space = tmp_path / "seeds.yaml"
    space.write_text("fixed: {dataset: alpaca, max_steps: 90, num_examples: 640}\n"
                     "sweep: {seed: {grid: [1, 2, 3, 4]}}\nresources: {max_concurrent: 1}\n")
    trials_file = tmp_path / "seeds" / "trials.parquet"
    driver = subprocess.Popen([sys.executable, "-m", "tune_lfm.search", str(space), "--storage", str(tmp_path),
                               "--name", "seeds", "--scale", "tiny"], env=ENV, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (trials_file.exists() and len(pd.read_parquet(trials_file)) >= 1):
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started, as if the machine died
    driver.wait()
    before = pd.read_parquet(trials_file).set_index("trial_id")
    assert 1 <= len(before) < 4

    out = search(space, "--storage", tmp_path, "--resume", "--scale", "tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    after = pd.read_parquet(trials_file).set_index("trial_id")
    assert len(after) == 4 and after.index.is_unique and set(after["status"]) == {"completed"}
    for trial_id, row in before.iterrows():  # finished trials were kept, not run again
        assert after.loc[trial_id, "finished_at"] == row["finished_at"]


def test_injected_oom_is_recorded_then_recovers_on_retry(tmp_path):
    space = tmp_path / "oom.yaml"
    space.write_text("fixed: {dataset: alpaca, max_steps: 60, num_examples: 640}\nsweep: {seed: {grid: [1, 2]}}\n"
                     "max_failures: 1\n")
    plan = subprocess.run([sys.executable, "-m", "tune_lfm.search", str(space), "--dry-run", "--json", "--scale",
                           "tiny"], capture_output=True, text=True, check=True, env=ENV)

    first, second = [row["trial_id"] for row in json.loads(plan.stdout)]
    env = {**ENV, "TUNE_LFM_FAULTS": f"{first}:oom,{second}:raise"}
    out = subprocess.run([sys.executable, "-m", "tune_lfm.search", str(space), "--storage", str(tmp_path), "--name",
                          "oom", "--scale", "tiny"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CUDA out of memory" in out.stderr
    trials = pd.read_parquet(tmp_path / "oom" / "trials.parquet").set_index("trial_id")
    assert set(trials["status"]) == {"completed"} and (trials["attempts"] == 2).all()


def test_gpu_share_is_a_whole_gpu_when_trial_memory_cannot_be_measured(capsys):
    """The probe runs as a Ray task on a GPU; where it fails (here: a logical GPU, no CUDA) trials get a whole GPU."""
    import ray

    from tune_lfm.config import TrialConfig
    from tune_lfm.search import measured_gpus_per_trial

    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        share = measured_gpus_per_trial(TrialConfig(model="tiny-lfm2", max_steps=2), cap=4)
    finally:
        ray.shutdown()
    assert share == 1.0
    err = capsys.readouterr().err
    assert "could not measure trial memory" in err and "needs a CUDA GPU" in err and "one trial per GPU" in err


def test_longest_trial_starts_first_and_rows_say_how_trials_ran(tmp_path):
    space = tmp_path / "lengths.yaml"
    space.write_text("fixed: {dataset: alpaca, num_examples: 16, eval_examples: 4, max_length: 128}\n"
                     "sweep: {max_steps: {grid: [2, 3, 8]}}\n"
                     "resources: {max_concurrent: 1}\n")
    out = search(space, "--storage", tmp_path, "--name", "exp", "--scale", "full", "--set", "model=tiny-lfm2",
                 "--set", "data_source=embedded")
    assert out.returncode == 0, out.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "exp" / "trials.parquet").sort_values("started_at")
    assert list(trials["max_steps"]) == [8, 3, 2]
    assert trials["packing_used"].all() and (trials["micro_batch_used"] == 4).all()
    assert not trials["gradient_checkpointing_used"].any() and (trials["gpus_per_trial"] == 0).all()
