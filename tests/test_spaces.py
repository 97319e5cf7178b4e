"""Every shipped sweep validates and plans the study's trial counts; malformed sweeps get named errors."""

import json
import subprocess
import sys

import pytest

from tune_lfm.config import ConfigError
from tune_lfm.spaces import load_sweep, plan_trials

EXPECTED = {"datasets": 10, "optimizers": 4, "learning_rate": 4, "rank": 5, "targets": 6, "duration": 6, "study": 30}


@pytest.mark.parametrize("name,count", EXPECTED.items())
@pytest.mark.parametrize("scale", ["full", "tiny"])
def test_shipped_sweeps_plan_expected_trials(name, count, scale):
    trials = plan_trials(load_sweep(name), scale)
    assert len(trials) == count
    if scale == "tiny":
        assert all(t.config.model == "tiny-lfm2" and t.config.data_source == "embedded" for t in trials)


def test_study_lists_the_shared_default_under_every_sweep():
    trials = plan_trials(load_sweep("study"), "full")
    assert sum(len(t.sweeps) for t in trials) == 35
    default = [t for t in trials if len(t.sweeps) > 1]
    assert {s for t in default for s in t.sweeps} == {"datasets", "optimizers", "learning_rate", "rank", "targets",
                                                     "duration"}


def test_pareto_is_an_optuna_multi_objective_search():
    sweep = load_sweep("pareto")
    assert sweep.search.algorithm == "optuna"
    assert sweep.search.objectives == {"train_loss": "min", "kl": "min", "trainable_params": "min"}
    assert sweep.dimensions["learning_rate"].kind == "loguniform"


def test_dry_run_json_computes_adapter_sizes_without_weights():
    out = subprocess.run([sys.executable, "-m", "tune_lfm.search", "targets", "--dry-run", "--json", "--scale",
                          "full"], capture_output=True, text=True, timeout=120, check=True)
    rows = json.loads(out.stdout)
    assert [r["trainable_params"] for r in rows] == [65_536, 212_992, 262_144, 229_376, 475_136, 737_280]


BAD_SWEEPS = [
    ("sweep: [oops\n", "not valid YAML"),
    ("colour: red\n", "unknown top-level key"),
    ("sweep: {lora_rnk: {grid: [2, 4]}}\n", "`lora_rnk` is not a trial setting"),
    ("sweep: {lora_rank: {grid: []}}\n", "non-empty list"),
    ("sweep: {lora_rank: {range: [1, 2]}}\n", "unknown kind `range`"),
    ("sweep: {learning_rate: {loguniform: [0, 1]}}\nsearch: {algorithm: random}\n", "bounds must be > 0"),
    ("sweep: {learning_rate: {loguniform: [1.0e-4, 1.0e-3]}}\n", "sampled dimensions"),
    ("fixed: {lora_rank: eight}\n", "`lora_rank` must be int"),
    ("search: {algorithm: hyperband}\n", "not one of grid, random, optuna"),
    ("search: {algorithm: optuna, objectives: {accuracy: max}}\n", "not a reported metric"),
    ("resources: {gpus: 1}\n", "unknown key"),
    ("resources: {max_concurrent: 1.5}\n", "resources.max_concurrent: must be a positive int"),
    ("resources: {cpus_per_trial: -1}\n", "resources.cpus_per_trial: must be a positive number or auto"),
    ("search: {num_samples: 0}\n", "search.num_samples: must be a positive int"),
    ("search: [grid]\n", "search: must be a mapping of algorithm, num_samples"),
    ("scheduler: {type: pbt}\n", "scheduler.type: `pbt` is not supported"),
    ("scheduler: {type: asha, reduction_factor: 1}\n", "scheduler.reduction_factor: must be an int > 1"),
]


@pytest.mark.parametrize("text,message", BAD_SWEEPS)
def test_malformed_sweeps_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep(str(path))
    assert "mine.yaml" in str(info.value)


def test_unknown_sweep_name_lists_known_ones():
    with pytest.raises(ConfigError, match="known: .*datasets"):
        load_sweep("datasetz")


def test_bad_values_inside_a_grid_are_caught_when_planning(tmp_path):
    path = tmp_path / "opt.yaml"
    path.write_text("sweep: {optimizer: {grid: [adamw, sgd]}}\n")
    with pytest.raises(ConfigError, match="opt.yaml: trial 1: `optimizer` is 'sgd'"):
        plan_trials(load_sweep(str(path)), "tiny")


def test_cli_reports_errors_without_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sweep: {lora_rank: {grid: [two]}}\n")
    out = subprocess.run([sys.executable, "-m", "tune_lfm.search", str(path), "--dry-run"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "bad.yaml" in out.stderr and "Traceback" not in out.stderr


def test_shipped_sweeps_are_found_inside_the_package_for_wheel_installs():
    """search_spaces/ is linked into tune_lfm/, where package data (and so a wheel) picks the files up."""
    from pathlib import Path

    import tune_lfm
    from tune_lfm.spaces import SPACES_DIR

    top_level = Path(__file__).resolve().parents[1] / "search_spaces"
    assert SPACES_DIR.parent == Path(tune_lfm.__file__).resolve().parent
    assert sorted(p.name for p in SPACES_DIR.glob("*.yaml")) == sorted(p.name for p in top_level.glob("*.yaml"))


def test_dry_run_table_says_the_scale_and_every_sweep_of_a_trial():
    out = subprocess.run([sys.executable, "-m", "tune_lfm.search", "study", "--dry-run", "--scale", "tiny"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("scale: TINY (embedded model and data; steps/5")
    assert any(" datasets,learning_rate,rank,targets,duration " in line for line in lines)  # the shared default
    assert lines[-1] == "30 trials"


def test_sweep_settings_are_typed_and_the_readme_table_is_their_documentation():
    """The search/scheduler/resources blocks come from dataclasses whose field docstrings are their documentation;
    the README's table of sweep settings is exactly those docstrings and defaults, so neither can drift."""
    from pathlib import Path

    from tune_lfm.sweep_settings import ResourceSettings, SearchSettings, settings_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for row in settings_table().splitlines():
        assert row in readme, f"README.md lacks: {row}"
    sweep = load_sweep("pareto")
    assert isinstance(sweep.search, SearchSettings) and isinstance(sweep.resources, ResourceSettings)
    assert ResourceSettings().cpus("tiny") == 1 and ResourceSettings().cpus("full") == 2


def test_two_spellings_of_one_trial_are_planned_once(tmp_path):
    """Hub layers written out in one variant and resolved from the model in the other give one trial, run once."""
    from tune_lfm.planning import make_plan, with_hub_layers

    path = tmp_path / "spellings.yaml"
    path.write_text("fixed: {model: tiny-lfm2, data_source: embedded, dataset: alpaca, lora_targets: hub_all}\n"
                    "sweep: {variants: {grid: [{}, {hub_layers: [0, 1, 2, 4]}, {lora_rank: 4}]}}\n")
    hubs = with_hub_layers(plan_trials(load_sweep(str(path)), "full"))[0].config.hub_layers
    assert hubs == [0, 1, 2, 4]  # what the model resolves to, so the first two variants are the same trial
    plan = make_plan(load_sweep(str(path)), "full", {})
    assert [t.config.lora_rank for t in plan.trials] == [8, 4] and plan.total == 2
    assert all(t.config.hub_layers == hubs for t in plan.trials)
    assert [t.sweeps for t in plan.trials] == [["spellings"], ["spellings"]]  # a sweep is named once per trial
    overridden = make_plan(load_sweep("optimizers"), "tiny", {"optimizer": "adamw"})  # --set collapses its grid
    assert plan.total == 2 and overridden.total == 1 and overridden.trials[0].sweeps == ["optimizers"]
