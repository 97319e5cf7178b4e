"""Bad input is refused before Ray starts and before any weights or rows are loaded: exit 2, one error naming the
flag or file, the key and what is allowed, no traceback, and nothing written to storage."""

import json
import shutil
from pathlib import Path

import pytest

from tune_lfm import search, trial
from tune_lfm.models import EMBEDDED_DIR

SWEEP = ("fixed: {{max_steps: 30}}\nuser_datasets:\n  mine: {{path: {path}, format: {format}}}\n"
         "sweep: {{dataset: {{grid: [{dataset}]}}}}\n")


def refused(capsys, main, *args) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: "), err
    return err


@pytest.fixture
def storage(tmp_path):
    path = tmp_path / "results"
    yield path
    assert not path.exists(), f"something was written to storage: {list(path.rglob('*'))}"


@pytest.mark.parametrize("rows,format,dataset,message", [
    (None, "alpaca", "mine", "local file .*nowhere.jsonl does not exist"),
    ("", "alpaca", "mine", r"has 0 usable row.*holds out the first \d+"),
    ('{"instruction": "", "output": "x"}\n' * 40, "alpaca", "mine", r"0 usable row.*40 empty 'instruction'"),
    ('{"instruction": "a", "output": "b"}\n', "chatml", "mine", "unknown format 'chatml'; allowed formats"),
    ("", "alpaca", "no-such-set", "unknown dataset 'no-such-set'; known datasets: alpaca"),
])
def test_sweep_datasets_are_checked_before_ray(tmp_path, storage, capsys, rows, format, dataset, message):
    data = tmp_path / ("nowhere.jsonl" if rows is None else "rows.jsonl")
    if rows is not None:
        data.write_text(rows)
    space = tmp_path / "mine.yaml"
    space.write_text(SWEEP.format(path=data, format=format, dataset=dataset))
    err = refused(capsys, search.main, space, "--storage", storage)
    assert "mine.yaml" in err
    import re

    assert re.search(message, err), err


@pytest.mark.parametrize("setting,message", [
    ("learning_rate=.nan", "--set: `learning_rate` must be a finite number, got nan"),
    ("learning_rate=.inf", "--set: `learning_rate` must be a finite number, got inf"),
    ("lora_dropout=5", r"--set: `lora_dropout` is a probability in \[0, 1\), got 5.0"),
    ("warmup_steps=-3", "--set: `warmup_steps` must be >= 0, got -3"),
    ("lora_alpha=-3", "--set: `lora_alpha` must be > 0, got -3"),
    ("max_steps=[x", r"--set 'max_steps=\[x': the value is not valid YAML"),
    ("lr_scheduler=sometimes", "`lr_scheduler` is 'sometimes'; allowed: linear, cosine"),
    ("lora_targets={modules: [nope]}", "match no Linear module"),
])
def test_bad_settings_are_refused_naming_the_flag(storage, capsys, setting, message):
    import re

    err = refused(capsys, search.main, "datasets", "--storage", storage, "--set", setting)
    assert re.search(message, err), err


def test_the_schedulers_allowed_are_exactly_transformers_scheduler_types():
    """The driver reads them from transformers' source instead of importing it (see `scheduler_names`)."""
    from transformers import SchedulerType

    from tune_lfm.validate import scheduler_names

    assert scheduler_names() == tuple(kind.value for kind in SchedulerType)


def test_resume_of_a_missing_experiment_is_refused(storage, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TUNE_LFM_CACHE", str(tmp_path / "empty-cache"))  # no atlas: refused before it is computed
    err = refused(capsys, search.main, "datasets", "--storage", storage, "--name", "does-not-exist", "--resume")
    assert "no experiment" in err and "does-not-exist" in err and "leave out --resume" in err


def test_a_model_that_cannot_be_found_is_a_named_error_and_leaves_nothing(storage, capsys):
    err = refused(capsys, search.main, "datasets", "--scale", "full", "--storage", storage, "--set",
                  "model=/no/such/model")
    assert "--model /no/such/model" in err


def test_an_existing_experiment_is_not_started_over(tmp_path, capsys):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "trials.parquet").write_bytes(b"")
    err = refused(capsys, search.main, "datasets", "--storage", tmp_path, "--name", "exp")
    assert "already exists; continue it with --resume" in err


@pytest.fixture(scope="module")
def weightless_model(tmp_path_factory) -> Path:
    """The embedded model's config and tokenizer without its weights: loading it for training would fail, so an
    error about anything else proves the check ran first."""
    model = tmp_path_factory.mktemp("weightless")
    for path in EMBEDDED_DIR.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, model / path.name)
    return model


@pytest.mark.parametrize("args,message", [
    (["--targets", "{modules: ["], r"--targets '\{modules: \[': not a preset .* and not valid YAML"),
    (["--hub-layers", "a,b"], "--hub-layers 'a,b': expected comma-separated decoder-layer indices"),
    (["--targets", "nosuch"], "unknown target set 'nosuch'; presets: hub_oproj"),
    (["--hub-layers", "99"], r"`hub_layers` \[99\] out of range: .* has 6 decoder layers \(0-5\)"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
])
def test_trial_cli_checks_before_loading_the_model_or_data(weightless_model, capsys, args, message):
    import re

    err = refused(capsys, trial.main, "--model", weightless_model, "--steps", "2", *args)
    assert re.search(message, err), err


def test_save_adapter_under_a_file_is_refused_before_training(weightless_model, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = refused(capsys, trial.main, "--model", weightless_model, "--steps", "2", "--save-adapter",
                  blocker / "adapter")
    assert f"--save-adapter {blocker}/adapter: {blocker} is a file" in err


@pytest.mark.slow
def test_a_failed_save_still_prints_the_result(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    (adapter / "adapter_config.json").mkdir(parents=True)  # the save itself fails, after training and measuring
    code = trial.main(["--model", "tiny-lfm2", "--dataset", "alpaca", "--steps", "2", "--max-length", "128",
                       "--num-examples", "16", "--save-adapter", str(adapter)])
    out = capsys.readouterr()
    assert code == 1, out.err[-2000:]
    result = json.loads(out.out)
    assert result["status"] == "completed" and result["steps_completed"] == 2
    assert "could not save the adapter" in result["adapter_error"]
    assert "error: could not save the adapter" in out.err and "Traceback" not in out.err
