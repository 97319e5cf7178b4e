"""The README's main job through the real CLI on local Ray at tiny scale: the datasets sweep lands in parquet, shows
that the miniature learns, and its best preset reruns to the same numbers. Faults and retries: test_recovery.py;
interrupts and resume: test_interrupts.py and test_s3_storage.py; Optuna: test_artifacts.py."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tune_lfm.spaces import TINY_SCALE

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}


def test_datasets_sweep_end_to_end_writes_both_dataframes(quickstart):
    experiment, out = quickstart
    assert "scale: TINY" in out.stderr
    # a quiet console: the scale line, a line per trial, the results table best first
    assert len(out.stderr.splitlines()) < 60, out.stderr
    table = out.stdout.splitlines()  # stdout holds the results table alone
    assert table[0].split()[:2] == ["trial_id", "dataset"] and len(table) == 12, out.stdout
    assert table[0].split()[5] == "probe_loss"  # ten datasets: ordered on the probe set they share
    losses = [float(line.split()[5].split("±")[0]) for line in table[2:]]
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


def test_gpu_share_is_a_whole_gpu_when_trial_memory_cannot_be_measured(capsys):
    """The probe runs as a Ray task on a GPU; where it fails (here: a logical GPU, no CUDA) trials get a whole GPU."""
    import ray

    from tune_lfm.config import TrialConfig
    from tune_lfm.runner import measured_gpus_per_trial

    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        share = measured_gpus_per_trial(TrialConfig(model="tiny-lfm2", max_steps=2), cap=4)
    finally:
        ray.shutdown()
    assert share == 1.0
    err = capsys.readouterr().err
    assert "could not measure trial memory" in err and "needs a CUDA GPU" in err and "one trial per GPU" in err
