"""The real trainer on the embedded model: every optimizer learns, KL means something, the CLI reports everything."""

import json
import math
import subprocess
import sys

import pytest
import torch

from tune_lfm import metrics
from tune_lfm.config import TrialConfig
from tune_lfm.models import load_model, load_tokenizer, resolve_model
from tune_lfm.trial import attach_lora, prepare_data, run_trial
from tune_lfm.trial import main as trial_main

QUICK = dict(model="tiny-lfm2", max_steps=6, batch_size=4, grad_accum=1, max_length=192, num_examples=48,
             eval_examples=16, learning_rate=2e-3, logging_steps=1)
RESULT_KEYS = {"train_loss", "eval_loss", "base_loss", "improvement", "kl", "kl_p95", "eval_loss_se", "base_loss_se",
               "improvement_se", "kl_se", "probe_loss", "probe_improvement", "trainable_params", "total_params",
               "tokens_trained", "tokens_per_s", "wall_s", "peak_mem_gb", "rows_skipped", "status"}


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "schedule_free_adamw", "lion"])
def test_each_optimizer_lowers_held_out_loss_and_saves_the_adapter_it_measured(optimizer, tmp_path):
    from peft import PeftModel

    lr = 6e-3 if optimizer == "lion" else 1e-2  # Lion's sign update takes steps of size lr on every weight
    config = TrialConfig(**{**QUICK, "learning_rate": lr}, dataset="alpaca", optimizer=optimizer,
                         lora_targets="all_linear")
    result = run_trial(config, log=lambda _: None, save_adapter=str(tmp_path / "adapter"))
    assert result["status"] == "completed"
    assert result["eval_loss"] < result["base_loss"] - 0.01, result
    assert result["improvement"] > 2 * result["improvement_se"] > 0  # a gain well above its noise
    assert result["kl"] > 2 * result["kl_se"] > 0
    assert RESULT_KEYS <= result.keys()
    assert result["steps_completed"] == 6 and len(result["history"]) == 6
    # the adapter on disk is the one measured (schedule-free's averaged weights, not its training-mode ones)
    ref = resolve_model("tiny-lfm2")
    tokenizer = load_tokenizer(ref)
    reloaded = PeftModel.from_pretrained(load_model(ref, torch.float32, "cpu"), str(tmp_path / "adapter"))
    measured = metrics.heldout_measures(reloaded.eval(), prepare_data(config, tokenizer).eval, config.kl_batch_size,
                                        tokenizer.pad_token_id, torch.device("cpu"))
    assert measured["eval_loss"] == pytest.approx(result["eval_loss"], abs=1e-5)


def test_untrained_adapter_has_zero_kl_and_exact_param_count():
    config = TrialConfig(**QUICK, dataset="alpaca", lora_targets="all_linear")
    ref = resolve_model(config.model)
    tokenizer = load_tokenizer(ref)
    data = prepare_data(config, tokenizer)
    model, targets = attach_lora(load_model(ref, torch.float32, "cpu"), config)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == targets.trainable_params(8)
    probe = metrics.probe_measures(model.eval(), data.probe[:8], 4, tokenizer.pad_token_id, "cpu")
    assert probe["kl_p95"] < 1e-6 and probe["probe_loss"] == probe["probe_base_loss"]


def test_non_finite_loss_ends_as_diverged_with_partial_metrics():
    result = run_trial(TrialConfig(**{**QUICK, "learning_rate": float("inf")}, dataset="dolly"), log=lambda _: None)
    assert result["status"] == "diverged"
    assert "non-finite loss" in result["error"]
    assert result["steps_completed"] < 6 and result["history"]


def test_cli_end_to_end_prints_every_metric(tmp_path, capsys):
    """The trial CLI's main in this process (the quickstart's preset rerun runs it as `python -m tune_lfm.trial`)."""
    adapter = tmp_path / "adapter"
    code = trial_main(["--model", "tiny-lfm2", "--dataset", "gsm8k", "--steps", "3", "--max-length", "192",
                       "--save-adapter", str(adapter)])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    result = json.loads(out.out)
    assert RESULT_KEYS <= result.keys()
    assert result["trainable_params"] == 26_624 and result["data_source_used"] == "embedded"
    assert all(math.isfinite(result[key]) for key in ("train_loss", "eval_loss", "base_loss", "kl"))
    assert (adapter / "adapter_config.json").is_file()
    assert "EMBEDDED" in out.err and "step 3/3  loss" in out.err


def test_cli_rejects_unknown_dataset_with_the_known_names():
    out = subprocess.run([sys.executable, "-m", "tune_lfm.trial", "--model", "tiny-lfm2", "--dataset", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "nope" in out.stderr and "smol-magpie-ultra" in out.stderr


def test_execution_settings_reach_the_trainer(tmp_path):
    """The planned micro-batch, packing and torch.compile are what SFTTrainer is configured with."""
    from tune_lfm.memory import MicroBatchPlan
    from tune_lfm.trial import _sft_config

    config = TrialConfig(**{**QUICK, "grad_accum": 4}, dataset="alpaca", torch_compile=True)
    args = _sft_config(config, MicroBatchPlan(8, 2, True, None), True, str(tmp_path), False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 2)
    assert args.padding_free and args.torch_compile and args.gradient_checkpointing
    unpacked = _sft_config(config.replace(torch_compile=False), MicroBatchPlan(4, 4, False, None), False,
                           str(tmp_path), False)
    assert not unpacked.padding_free and unpacked.max_length == config.max_length and not unpacked.torch_compile


def test_progress_line_is_written_about_ten_times_into_a_log():
    import io

    from tune_lfm.progress import StepProgress

    stream = io.StringIO()
    progress = StepProgress(95, stream)
    for step in range(1, 96):
        progress({"step": step, "loss": 1.0, "tokens_per_s": 100.0, "elapsed_s": step * 2.0})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("step 95/95")  # every 9th step, and the last
    assert "ETA 0s" in lines[-1] and "ETA 2m52s" in lines[0]  # 9 steps done in 18 s, 86 to go
