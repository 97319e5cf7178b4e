"""Faults, retries and repeatable numbers, on one real local Ray sweep (tiny scale, one trial at a time).

The sweep's six trials each carry a drill:
- the first two train the same thing (they differ only in the KL batch size, used after training) and are the longest,
  so they start first: the first in a fresh Ray worker, the second in that worker reused; their training numbers must
  be bit-identical;
- `kill`: the worker process is SIGKILLed right after its first step; Tune retries it, the fault does not fire again,
  and only the successful attempt's steps are kept;
- `oom`: a CUDA out-of-memory error on the first attempt, recorded, then the retry completes;
- `nan`: the loss goes non-finite: recorded as diverged, its adapter kept and marked;
- `fail`: raises on every attempt: recorded as failed with its error after its retry, while the sweep completes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from cli import warnings_on

from tune_lfm.planning import with_hub_layers
from tune_lfm.spaces import load_sweep, plan_trials

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
SPACE = """
fixed: {dataset: alpaca, max_steps: 20, num_examples: 320, lora_targets: o_proj}
sweep:
  variants:
    grid:
      - {kl_batch_size: 8, max_steps: 30}
      - {kl_batch_size: 4, max_steps: 30}
      - {seed: 7}
      - {seed: 8}
      - {seed: 9}
      - {seed: 10}
resources: {max_concurrent: 1}
max_failures: 1
"""
DRILLS = ("fresh", "reused", "kill", "oom", "nan", "fail")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recovery")
    space = tmp / "recovery.yaml"
    space.write_text(SPACE)
    ids = dict(zip(DRILLS, [t.trial_id for t in with_hub_layers(plan_trials(load_sweep(str(space)), "tiny"))]))
    faults = ",".join(f"{ids[kind]}:{kind}" for kind in ("kill", "oom", "nan", "fail"))
    out = subprocess.run([sys.executable, "-m", "tune_lfm.search", str(space), "--storage", str(tmp), "--name", "exp",
                          "--scale", "tiny"], capture_output=True, text=True, timeout=600,
                         env={**ENV, "TUNE_LFM_FAULTS": faults})
    assert out.returncode == 0, out.stderr[-3000:]
    return {"out": out, "ids": ids, "dir": tmp / "exp",
            "trials": pd.read_parquet(tmp / "exp" / "trials.parquet").set_index("trial_id"),
            "history": pd.read_parquet(tmp / "exp" / "history.parquet")}


def test_a_trial_whose_worker_process_dies_completes_on_retry(sweep):
    trials, killed = sweep["trials"], sweep["ids"]["kill"]
    assert trials.loc[killed, "status"] == "completed" and trials.loc[killed, "attempts"] == 2
    assert "died" in sweep["out"].stderr  # Ray saw the worker process die: a real death, not an exception
    steps = sweep["history"].query("trial_id == @killed")["step"].tolist()
    assert steps == [1, 2, 3, 4]  # the successful attempt's steps only, each once


def test_injected_oom_is_recorded_then_recovers_on_retry(sweep):
    trials, oom = sweep["trials"], sweep["ids"]["oom"]
    assert "CUDA out of memory" in sweep["out"].stderr
    assert trials.loc[oom, "status"] == "completed" and trials.loc[oom, "attempts"] == 2


def test_failures_and_divergence_are_recorded_while_the_sweep_completes(sweep):
    trials, ids = sweep["trials"], sweep["ids"]
    assert len(trials) == 6
    assert trials.loc[ids["fail"], "status"] == "failed" and "injected fault" in trials.loc[ids["fail"], "error"]
    assert trials.loc[ids["fail"], "attempts"] == 2 and pd.isna(trials.loc[ids["fail"], "adapter_uri"])
    assert trials.loc[ids["nan"], "status"] == "diverged" and "non-finite" in trials.loc[ids["nan"], "error"]
    diverged = json.loads((Path(trials.loc[ids["nan"], "adapter_uri"]) / "tune_lfm_trial.json").read_text())
    assert diverged["status"] == "diverged"  # its adapter is kept too, marked
    untouched = [ids[kind] for kind in ("fresh", "reused")]
    assert (trials.loc[untouched, "status"] == "completed").all() and (trials.loc[untouched, "attempts"] == 1).all()
    assert "finished: 4 completed, 1 diverged, 1 failed" in sweep["out"].stderr


def test_the_same_config_trains_identically_in_a_fresh_and_a_reused_worker(sweep):
    trials, history = sweep["trials"], sweep["history"].set_index(["trial_id", "step"])
    fresh, reused = sweep["ids"]["fresh"], sweep["ids"]["reused"]
    assert trials.loc[fresh, "train_loss"] == trials.loc[reused, "train_loss"]
    assert history.loc[fresh, "loss"].tolist() == history.loc[reused, "loss"].tolist()
    assert history.loc[fresh, "grad_norm"].tolist() == history.loc[reused, "grad_norm"].tolist()


def test_longest_trials_start_first_and_rows_say_how_trials_ran(sweep):
    trials, ids = sweep["trials"], sweep["ids"]
    first_attempts = trials[trials["attempts"] == 1].sort_values("started_at")
    assert list(first_attempts.index[:2]) == [ids["fresh"], ids["reused"]]  # 6 steps before the 4-step trials
    ran = trials[trials["status"] != "failed"]
    assert ran["packing_used"].all() and (ran["micro_batch_used"] == 4).all()
    assert not ran["gradient_checkpointing_used"].any() and (ran["gpus_per_trial"] == 0).all()
    assert (ran["lm_head_used"] == "lean").all()  # the CPU path, recorded in trials.parquet


def test_trial_directories_hold_tunes_result_json_and_nothing_unasked(sweep):
    """Without --log tensorboard no event files; no progress.csv beside trials.parquet; and no warning from Ray or
    Tune on the console (Tune's automatic TensorBoard logger warned at every batch of step rows) but, on a busy
    machine, the one slow-callback notice the quiet console keeps."""
    trial_dirs = [path for path in sweep["dir"].iterdir() if (path / "params.json").is_file()]
    assert len(trial_dirs) == len(DRILLS)
    assert all((path / "result.json").is_file() for path in trial_dirs)
    assert not list(sweep["dir"].rglob("events.out.tfevents.*")) and not list(sweep["dir"].rglob("progress.csv"))
    assert not warnings_on(sweep["out"].stderr), sweep["out"].stderr[-3000:]
