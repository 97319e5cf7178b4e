"""Both benchmarks run end to end on tiny-lfm2 and print the JSON their readers (RESULTS.md, gpu_check.sh) expect."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ARM_KEYS = {"tokens_per_s", "step_s", "peak_mem_gb", "final_loss", "losses", "tokens_seen", "micro_batch",
            "gradient_checkpointing", "padding_free", "attention", "lean_lm_head", "frozen_linear_onednn"}


def run_benchmark(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.slow
def test_throughput_compares_plain_trl_with_the_trial_path_on_the_same_tokens():
    report = run_benchmark("throughput.py", "--steps", "2", "--batch-size", "1", "--grad-accum", "2",
                           "--max-length", "64", "--device", "cpu")
    assert {"speedup", "losses_agree", "final_loss_rel_diff", "same_tokens", "examples", "settings"} <= report.keys()
    plain, fast = report["arms"]["plain_trl"], report["arms"]["tune_lfm"]
    assert ARM_KEYS <= plain.keys() and ARM_KEYS <= fast.keys()
    assert plain["gradient_checkpointing"] and not plain["padding_free"]
    assert fast["padding_free"] and not fast["gradient_checkpointing"]
    assert fast["lean_lm_head"] and not plain["lean_lm_head"]  # on the CPU the trial path takes the lean LM head
    assert fast["frozen_linear_onednn"] and not plain["frozen_linear_onednn"]  # and oneDNN for the frozen layers
    assert report["same_tokens"] and report["losses_agree"]
    assert plain["losses"][0] == pytest.approx(fast["losses"][0], rel=1e-4)
    assert report["speedup"] == pytest.approx(fast["tokens_per_s"] / plain["tokens_per_s"])
    assert fast["tokens_seen"] == plain["tokens_seen"] > 0


@pytest.mark.slow
def test_study_wall_times_a_sweep_and_breaks_it_down(tmp_path):
    space = tmp_path / "one.yaml"
    space.write_text("description: one tiny trial\n"
                     "fixed: {dataset: alpaca, max_steps: 4, num_examples: 16, eval_examples: 4, max_length: 128}\n"
                     "sweep: {lora_rank: {grid: [8]}}\n")
    report = run_benchmark("study_wall.py", "--space", str(space), "--scale", "tiny")
    assert report["trials"]["count"] == 1 and report["trials"]["completed"] == 1
    assert report["trials"]["packing_used"] == {"True": 1} and report["trials"]["gpus_per_trial"] == {"0.0": 1}
    assert {"startup_s", "trials_span_s", "shutdown_s", "concurrency"} <= report["study"].keys()
    phases = report["trial_seconds"]
    assert {"in_worker_s", "run_trial_wall_s", "train_s", "other_s", "first_step_s"} <= phases.keys()
    assert 0 < phases["train_s"] <= phases["run_trial_wall_s"] <= phases["in_worker_s"]
    assert report["wall_s"] >= report["study"]["trials_span_s"]
