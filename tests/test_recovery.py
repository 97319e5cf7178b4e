"""Retries that recover and numbers that repeat, on one real local Ray sweep (tiny scale, one trial at a time).

The sweep's first two trials train the same thing (they differ only in the KL batch size, which is used after
training): the first runs in a fresh Ray worker, the second in that worker reused, so their training numbers must
be bit-identical. The third trial's worker process is SIGKILLed right after its first step: Tune retries it, the fault
does not fire again, and only the successful attempt's steps are kept.
"""

import os
import subprocess
import sys

import pandas as pd
import pytest

from tune_lfm.search import with_hub_layers
from tune_lfm.spaces import load_sweep, plan_trials

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
SPACE = """
fixed: {dataset: alpaca, max_steps: 20, num_examples: 320, lora_targets: o_proj}
sweep:
  variants:
    grid:
      - {kl_batch_size: 8}
      - {kl_batch_size: 4}
      - {seed: 7}
resources: {max_concurrent: 1}
max_failures: 1
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recovery")
    space = tmp / "recovery.yaml"
    space.write_text(SPACE)
    fresh, reused, killed = [t.trial_id for t in with_hub_layers(plan_trials(load_sweep(str(space)), "tiny"))]
    out = subprocess.run([sys.executable, "-m", "tune_lfm.search", str(space), "--storage", str(tmp), "--name", "exp",
                          "--scale", "tiny"], capture_output=True, text=True, timeout=600,
                         env={**ENV, "TUNE_LFM_FAULTS": f"{killed}:kill"})
    assert out.returncode == 0, out.stderr[-3000:]
    return {"out": out, "ids": {"fresh": fresh, "reused": reused, "killed": killed},
            "trials": pd.read_parquet(tmp / "exp" / "trials.parquet").set_index("trial_id"),
            "history": pd.read_parquet(tmp / "exp" / "history.parquet")}


def test_a_trial_whose_worker_process_dies_completes_on_retry(sweep):
    trials, killed = sweep["trials"], sweep["ids"]["killed"]
    assert set(trials["status"]) == {"completed"} and len(trials) == 3
    assert trials.loc[killed, "attempts"] == 2
    assert trials.drop(index=killed)["attempts"].tolist() == [1, 1]
    assert "died" in sweep["out"].stderr  # Ray saw the worker process die: a real death, not an exception
    steps = sweep["history"].query("trial_id == @killed")["step"].tolist()
    assert steps == [1, 2, 3, 4]  # the successful attempt's steps only, each once


def test_the_same_config_trains_identically_in_a_fresh_and_a_reused_worker(sweep):
    trials, history = sweep["trials"], sweep["history"].set_index(["trial_id", "step"])
    fresh, reused = sweep["ids"]["fresh"], sweep["ids"]["reused"]
    assert trials.loc[fresh, "train_loss"] == trials.loc[reused, "train_loss"]
    assert history.loc[fresh, "loss"].tolist() == history.loc[reused, "loss"].tolist()
    assert history.loc[fresh, "grad_norm"].tolist() == history.loc[reused, "grad_norm"].tolist()
