"""The README's main job, `python -m tune_lfm.search datasets`, through the real CLI on local Ray at tiny scale (no
GPU here), and everything that reads its finished sweep: the console and both dataframes, a preset that reruns to its
numbers, adapters that load and generate, exports that transformers loads, adapter pruning, and the MLflow and
TensorBoard runs (logging is on for this run). The sweep runs once, for this module alone, so pytest-xdist keeps all
of it on one worker."""

import glob
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from cli import run_module, warnings_on

from tune_lfm.runner import STEP_REPORT_EVERY_S
from tune_lfm.spaces import TINY_SCALE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The finished sweep's directory and the finished process (its stdout and stderr)."""
    storage = tmp_path_factory.mktemp("quickstart")
    out = run_module("tune_lfm.search", "datasets", "--storage", storage, "--name", "exp", "--log", "mlflow", "--log",
                     "tensorboard")
    assert out.returncode == 0, out.stderr[-3000:]
    return storage / "exp", out


@pytest.fixture(scope="module")
def report(quickstart, tmp_path_factory):
    """The analysis CLI's report on the finished sweep (its presets, each naming its trial and adapter)."""
    directory, _ = quickstart
    out = tmp_path_factory.mktemp("report")
    analysis = run_module("tune_lfm.analysis", directory, "--out", out, "--quiet", timeout=300)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sweep(quickstart):
    """The sweep's directory, trials.parquet and history.parquet: 10 trials, 10 adapters."""
    directory, _ = quickstart
    return directory, pd.read_parquet(directory / "trials.parquet"), pd.read_parquet(directory / "history.parquet")


def test_datasets_sweep_end_to_end_writes_both_dataframes(quickstart):
    experiment, out = quickstart
    assert "scale: TINY" in out.stderr
    # a quiet console: the scale line, a line per trial, the results table best first
    assert len(out.stderr.splitlines()) < 60, out.stderr
    assert "Loading weights" not in out.stderr and "INFO mlflow" not in out.stderr, out.stderr
    assert not warnings_on(out.stderr), out.stderr  # Ray's note that it turned on token authentication included
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


def test_steps_reach_the_driver_a_second_at_a_time(sweep):
    """Each Tune report pauses training until the driver has handled it, so a trial sends its step rows in batches
    (runner.StepBatches): every step arrives once and in order, in far fewer results than steps."""
    _, trials, _ = sweep
    for row in trials.itertuples():
        results = [json.loads(line) for line in (Path(row.adapter_uri).parent / "result.json").read_text().splitlines()]
        batches = [result["steps"] for result in results if result.get("kind") == "steps"]
        assert [step["step"] for batch in batches for step in batch] == list(range(1, 61)), row.dataset
        assert len(batches) <= row.train_s / STEP_REPORT_EVERY_S + 2, (row.dataset, len(batches), row.train_s)


def test_a_preset_reruns_its_trial(quickstart, report):
    """The analysis picks best_quality from the sweep; the preset alone, run by the trial CLI, gives its numbers."""
    experiment, _ = quickstart
    preset = report / "presets" / "best_quality.yaml"
    trial_id = next(line.split()[2].rstrip(".") for line in preset.read_text().splitlines()
                    if line.startswith("# trial_id:"))
    recorded = pd.read_parquet(experiment / "trials.parquet").set_index("trial_id").loc[trial_id]
    rerun = run_module("tune_lfm.trial", "--config", preset, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout)
    assert result["base_loss"] == pytest.approx(recorded["base_loss"], abs=1e-6)  # same rows, same model
    assert result["trainable_params"] == recorded["trainable_params"] and result["max_steps"] == recorded["max_steps"]
    for metric in ("eval_loss", "kl", "probe_loss"):
        noise = 2 * recorded[f"{metric}_se"]
        assert abs(result[metric] - recorded[metric]) <= noise, (metric, result[metric], recorded[metric], noise)



def tiny_base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tune_lfm.models import resolve_model

    source = resolve_model("tiny-lfm2").source
    return AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)


def prompt_ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": "Name a prime number."}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)


def test_every_trial_leaves_a_peft_adapter_that_loads_and_generates(sweep):
    import torch
    from peft import PeftModel

    directory, trials, _ = sweep
    assert len(trials) == 10 and set(trials["status"]) == {"completed"}
    base, tokenizer = tiny_base()
    inputs = prompt_ids(tokenizer)
    for row in trials.itertuples():
        adapter = Path(row.adapter_uri)
        assert adapter.parent.parent == directory and adapter.name.startswith("checkpoint_")
        files = sorted(p.name for p in adapter.iterdir())
        assert {"adapter_model.safetensors", "adapter_config.json", "tune_lfm_trial.json"} <= set(files)
        assert row.adapter_bytes == sum(p.stat().st_size for p in adapter.iterdir())
        described = json.loads((adapter / "tune_lfm_trial.json").read_text())
        assert described["trial_id"] == row.trial_id and described["base_model"] == "tiny-lfm2"
        assert described["base_model_revision"].startswith("sha256:")
        assert described["config"]["dataset"] == row.dataset
        assert described["metrics"]["train_loss"] == pytest.approx(row.train_loss)
        model = PeftModel.from_pretrained(base, str(adapter))
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 5
        with model.disable_adapter(), torch.no_grad():  # the adapter changed the model
            before = model(**inputs).logits
        with torch.no_grad():
            assert not torch.equal(before, model(**inputs).logits)
        base = model.unload()


def test_export_best_quality_merged_loads_with_automodel_and_matches_the_adapter(sweep, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, trials, _ = sweep
    out = run_module("tune_lfm.export", directory, "--preset", "best_quality", "--out", tmp_path / "merged",
                     "--merge", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    card = (tmp_path / "merged" / "README.md").read_text()
    chosen = re.search(r"The merged model from trial `(\w+)`", card).group(1)  # the trial the analysis chose
    best = trials.set_index("trial_id", drop=False).loc[chosen]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template
    inputs = prompt_ids(tokenizer)
    base, _ = tiny_base()
    adapted = PeftModel.from_pretrained(base, best["adapter_uri"])
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted(**inputs).logits, rtol=1e-4, atol=1e-4)
    assert "best_quality" in card and "datasets" in card
    assert f"| optimizer | {best['optimizer']} |" in card and f"| train_loss | {best['train_loss']:.6g} |" in card


def test_export_adapter_by_trial_id_loads_with_peft_and_bad_input_exits_2(sweep, tmp_path):
    from peft import AutoPeftModelForCausalLM

    directory, trials, _ = sweep
    trial_id = trials["trial_id"].iloc[0]
    out = run_module("tune_lfm.export", directory, "--trial", trial_id, "--out", tmp_path / "adapter", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert model.peft_config["default"].r == 8
    assert trial_id in (tmp_path / "adapter" / "README.md").read_text()

    missing = run_module("tune_lfm.export", directory, "--trial", "nope", "--out", tmp_path / "x", timeout=300)
    assert missing.returncode == 2 and "no trial 'nope'" in missing.stderr and "Traceback" not in missing.stderr
    full = run_module("tune_lfm.export", directory, "--trial", trial_id, "--out", tmp_path / "adapter", timeout=300)
    assert full.returncode == 2 and "not empty" in full.stderr


def test_presets_name_their_adapter(sweep, report):
    _, trials, _ = sweep
    preset = (report / "presets" / "best_quality.yaml").read_text()
    trial_id = next(line.split()[2] for line in preset.splitlines() if line.startswith("# trial_id:"))
    best = trials.set_index("trial_id").loc[trial_id]
    assert f"# Adapter: {best['adapter_uri']}\n" in preset


@pytest.mark.parametrize("keep", ["pareto", "none"])
def test_keep_adapters_prunes_all_but_the_pareto_front_or_everything(sweep, tmp_path, keep):
    from tune_lfm.analysis.pipeline import analyse
    from tune_lfm.checkpoints import prune_adapters

    directory, trials, _ = sweep
    copy = tmp_path / "exp"
    shutil.copytree(directory, copy)
    prune_adapters(str(copy), keep, log=print)
    after = pd.read_parquet(copy / "trials.parquet").set_index("trial_id")
    front = set(analyse([str(directory)]).pareto["trial_id"]) if keep == "pareto" else set()
    remaining = {Path(p).parent.name.split("-")[0] for p in glob.glob(str(copy / "*" / "checkpoint_*"))}
    assert remaining == front
    assert set(after.index[after["adapter_uri"].notna()]) == front
    assert len(glob.glob(str(directory / "*" / "checkpoint_*"))) == 10  # the original is untouched


def test_mlflow_and_tensorboard_hold_the_numbers_of_the_dataframes(sweep):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    directory, trials, history = sweep
    client = MlflowClient(tracking_uri=f"sqlite:///{directory}/mlflow.db")
    experiment = client.get_experiment_by_name("exp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 10
    by_trial = trials.set_index("trial_id")
    for run in runs:
        trial_id = run.data.params["trial/trial_id"]
        row = by_trial.loc[trial_id]
        assert run.data.params["trial/config/dataset"] == row["dataset"]
        for metric in ("train_loss", "eval_loss", "base_loss", "kl", "trainable_params", "tokens_trained"):
            assert run.data.metrics[metric] == pytest.approx(float(row[metric]), rel=1e-12), metric
        assert "kind" not in run.data.metrics and "loss" not in run.data.metrics
        losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "step/loss")}
        steps = history[history["trial_id"] == trial_id].set_index("step")["loss"]
        assert losses == pytest.approx(steps.to_dict(), rel=1e-12)

    for trial_id, row in by_trial.iterrows():
        [events] = glob.glob(str(Path(row["adapter_uri"]).parent / "events.out.tfevents.*"))
        scalars = EventAccumulator(events).Reload()
        logged = {e.step: e.value for e in scalars.Scalars("ray/tune/step/loss")}
        steps = history[history["trial_id"] == trial_id].set_index("step")["loss"]
        assert logged == pytest.approx(steps.to_dict(), rel=1e-6)  # TensorBoard stores float32
        [final] = scalars.Scalars("ray/tune/train_loss")
