"""What a sweep prints: trials named by what varies, sorted by held-out loss, with their standard errors."""

import math

from tune_lfm.console import results_table, trial_line, varied_settings
from tune_lfm.config import TrialConfig


def row(trial_id, dataset, eval_loss, status="completed", **extra):
    return {**TrialConfig(dataset=dataset, model="tiny-lfm2").to_dict(), "trial_id": trial_id, "status": status,
            "eval_loss": eval_loss, "eval_loss_se": 0.01, "improvement": 0.3, "improvement_se": 0.02, "kl": 0.2,
            "kl_se": 0.005, "trainable_params": 26624, "wall_s": 61.2, **extra}


def test_table_names_trials_by_what_varies_best_first_and_failures_last():
    rows = [row("b", "gsm8k", 2.5), row("c", "dolly", math.nan, status="failed", error="boom"), row("a", "alpaca", 2.1)]
    assert varied_settings(rows) == ["dataset"]
    lines = results_table(rows).splitlines()
    assert lines[0].split() == ["trial_id", "dataset", "status", "eval_loss", "improvement", "kl", "params", "wall_s"]
    assert [line.split()[0] for line in lines[2:]] == ["a", "b", "c"]
    assert "2.1000±0.0100" in lines[2] and "26,624" in lines[2] and lines[4].split()[3] == "-"


def test_a_finished_trial_is_one_line_and_a_failed_one_says_why():
    rows = [row("a", "alpaca", 2.1), row("c", "dolly", math.nan, status="failed", error="CUDA out of memory")]
    assert trial_line(rows[0], ["dataset"]) == ("a  dataset=alpaca  completed  eval 2.1000±0.0100  "
                                                "gain 0.3000±0.0200  kl 0.2000±0.0050  61 s")
    assert trial_line(rows[1], ["dataset"]).endswith("failed: CUDA out of memory")
