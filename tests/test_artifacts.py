"""What a sweep leaves: adapters on storage that load and generate, exports that transformers loads, tracker runs
and an Optuna study holding trials.parquet's numbers, and a trial whose worker is killed mid-way going on from its
checkpoint. The quickstart's sweep (tests/conftest.py) and a two-trial Optuna search on local Ray serve all
assertions."""

import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from ray_results import resume_checkpoint_held

pytestmark = pytest.mark.slow
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
ENV.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_DEDUP_LOGS="0")


def run_module(module, *args, timeout=900, **kwargs):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kwargs)


@pytest.fixture(scope="module")
def sweep(quickstart):
    """The quickstart's datasets sweep (tests/conftest.py), run with MLflow and TensorBoard logging: 10 trials, 10
    adapters."""
    directory, _ = quickstart
    return directory, pd.read_parquet(directory / "trials.parquet"), pd.read_parquet(directory / "history.parquet")


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
    import re

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


def test_presets_name_their_adapter(sweep, tmp_path):
    directory, trials, _ = sweep
    out = run_module("tune_lfm.analysis", directory, "--out", tmp_path, "--quiet", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    preset = (tmp_path / "presets" / "best_quality.yaml").read_text()
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
        assert final.value == pytest.approx(row["train_loss"], rel=1e-6) and final.step == row["steps_completed"]


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
