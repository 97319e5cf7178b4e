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

from tune_lfm.search import with_hub_layers
from tune_lfm.spaces import TINY_SCALE, load_sweep, plan_trials

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}


def search(*args, timeout=900, env=ENV, **kwargs):
    return subprocess.run([sys.executable, "-m", "tune_lfm.search", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The README's main job: the datasets sweep at tiny scale, run once for the tests that read it."""
    storage = tmp_path_factory.mktemp("quickstart")
    out = search("datasets", "--storage", storage, "--name", "exp")
    assert out.returncode == 0, out.stderr[-3000:]
    return storage / "exp", out


def test_datasets_sweep_end_to_end_writes_both_dataframes(quickstart):
    experiment, out = quickstart
    assert "scale: TINY" in out.stderr
    # a quiet console: the scale line, a line per trial, the results table best first
    assert len(out.stderr.splitlines()) < 60, out.stderr
    lines = out.stdout.splitlines()
    table = lines[max(i for i, line in enumerate(lines) if line.startswith("trial_id")):]  # printed last
    assert table[0].split()[:2] == ["trial_id", "dataset"] and len(table) == 12
    losses = [float(line.split()[3].split("±")[0]) for line in table[2:]]
    assert losses == sorted(losses)
    trials = pd.read_parquet(experiment / "trials.parquet")
    assert len(trials) == 10 and set(trials["status"]) == {"completed"}, trials[["dataset", "status", "error"]]
    assert sorted(trials["dataset"]) == sorted(["smol-magpie-ultra", "ultrachat", "finetome", "magicoder", "tulu3",
                                                 "openhermes", "slimorca", "gsm8k", "dolly", "alpaca"])
    for column in ("train_loss", "eval_loss", "base_loss", "kl", "tokens_per_s", "wall_s", "trainable_params"):
        assert trials[column].notna().all(), column
    assert (trials["scale"] == "tiny").all() and (trials["sweep"] == "datasets").all()
    assert (trials["lr_multiplier"] == TINY_SCALE.lr_multiplier).all()
    assert (trials["scale_rule"] == TINY_SCALE.describe()).all()
    # the miniature learns: every dataset's held-out gain is well above its noise, and the model really moved
    learned = trials.set_index("dataset")
    assert (learned["improvement"] > 2 * learned["improvement_se"]).all(), learned[["improvement", "improvement_se"]]
    assert (learned["kl"] > 1e-3).all(), learned["kl"]
    history = pd.read_parquet(experiment / "history.parquet")
    assert set(history["trial_id"]) == set(trials["trial_id"])
    assert (history.groupby("trial_id")["step"].max() == 60).all()

    import duckdb
    import polars as pl

    assert pl.read_parquet(experiment / "trials.parquet").height == 10
    uri = str(experiment / "trials.parquet")
    assert duckdb.sql(f"select count(*) from '{uri}' where status = 'completed'").fetchall()[0][0] == 10


def test_a_preset_reruns_its_trial(quickstart, tmp_path):
    """The analysis picks best_quality from the sweep; the preset alone, run by the trial CLI, gives its numbers."""
    import json

    experiment, _ = quickstart
    report = tmp_path / "report"
    analysis = subprocess.run([sys.executable, "-m", "tune_lfm.analysis", str(experiment), "--out", str(report)],
                              capture_output=True, text=True, timeout=300, env=ENV)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    preset = report / "presets" / "best_quality.yaml"
    trial_id = next(line.split()[2].rstrip(".") for line in preset.read_text().splitlines()
                    if line.startswith("# trial_id:"))
    recorded = pd.read_parquet(experiment / "trials.parquet").set_index("trial_id").loc[trial_id]
    rerun = subprocess.run([sys.executable, "-m", "tune_lfm.trial", "--config", str(preset)], capture_output=True,
                           text=True, timeout=600, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout)
    assert result["base_loss"] == pytest.approx(recorded["base_loss"], abs=1e-6)  # same rows, same model
    assert result["trainable_params"] == recorded["trainable_params"] and result["max_steps"] == recorded["max_steps"]
    for metric in ("eval_loss", "kl", "probe_loss"):
        noise = 2 * recorded[f"{metric}_se"]
        assert abs(result[metric] - recorded[metric]) <= noise, (metric, result[metric], recorded[metric], noise)


def test_failures_and_divergence_are_recorded_while_the_sweep_completes(tmp_path):
    space = tmp_path / "faults.yaml"
    space.write_text("fixed: {dataset: alpaca, max_steps: 20, num_examples: 640, lora_targets: o_proj}\n"
                     "sweep: {seed: {grid: [1, 2, 3]}}\nmax_failures: 0\n")
    ok, failing, diverging = [t.trial_id for t in with_hub_layers(plan_trials(load_sweep(str(space)), "tiny"))]
    out = search(space, "--storage", tmp_path, "--name", "faults", "--scale", "tiny",
                 env={**ENV, "TUNE_LFM_FAULTS": f"{failing}:raise,{diverging}:nan"})
    assert out.returncode == 0, out.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "faults" / "trials.parquet").set_index("trial_id")
    assert trials.loc[ok, "status"] == "completed"
    assert trials.loc[failing, "status"] == "failed" and "injected fault" in trials.loc[failing, "error"]
    assert trials.loc[diverging, "status"] == "diverged" and "non-finite" in trials.loc[diverging, "error"]
    diverged = json.loads((Path(trials.loc[diverging, "adapter_uri"]) / "tune_lfm_trial.json").read_text())
    assert diverged["status"] == "diverged"  # its adapter is kept too, marked
    assert pd.isna(trials.loc[failing, "adapter_uri"])


def test_optuna_two_objective_search_stores_its_study(tmp_path):
    space = tmp_path / "mo.yaml"
    space.write_text("""
fixed: {dataset: alpaca, max_steps: 20, num_examples: 640}
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
    space.write_text("fixed: {dataset: alpaca, max_steps: 30, num_examples: 640}\n"
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
    space.write_text("fixed: {dataset: alpaca, max_steps: 20, num_examples: 640}\nsweep: {seed: {grid: [1, 2]}}\n"
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
