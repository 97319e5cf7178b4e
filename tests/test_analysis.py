"""tune_lfm.analysis: Pareto fronts, presets, tables, report and CLI, on the published table and synthetic sweeps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tune_lfm.analysis.__main__ import main
from tune_lfm.analysis.pareto import on_front, pareto_mask, parse_objectives
from tune_lfm.analysis.noise import ties_with, verdict
from tune_lfm.analysis.pipeline import Settings, analyse, write_outputs
from tune_lfm.analysis.presets import PresetRules, preset_yaml
from tune_lfm.analysis.spreads import what_mattered_most
from tune_lfm.analysis.schema import AnalysisError
from tune_lfm.config import FIELD_NAMES, TrialConfig, load_config_file
from tune_lfm.results import trials_frame

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "analysis" / "reference" / "seed_tables.csv"


def brute_force_front(points: list[tuple], senses: list[str]) -> list[bool]:
    """Textbook definition, written independently: i is kept unless some j is no worse everywhere, better somewhere."""
    sign = [1 if s == "min" else -1 for s in senses]
    costs = [[v * k for v, k in zip(p, sign)] for p in points]
    kept = []
    for i, a in enumerate(costs):
        dominated = False
        for j, b in enumerate(costs):
            if j != i and all(y <= x for x, y in zip(a, b)) and any(y < x for x, y in zip(a, b)):
                dominated = True
        kept.append(not dominated)
    return kept


@pytest.mark.parametrize("seed", range(40))
def test_pareto_mask_equals_brute_force_with_ties_and_duplicates(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 40)), int(rng.integers(2, 5))
    values = rng.integers(0, 4, size=(n, k)).astype(float)  # few levels: many ties and exact duplicates
    senses = [str(s) for s in rng.choice(["min", "max"], size=k)]
    assert pareto_mask(values, senses).tolist() == brute_force_front([tuple(r) for r in values], senses)


def test_pareto_keeps_duplicates_and_drops_a_point_tied_in_one_objective():
    points = np.array([[1, 2], [1, 2], [1, 3], [2, 1], [3, 1]], dtype=float)
    assert pareto_mask(points, ["min", "min"]).tolist() == [True, True, False, True, False]


def test_trials_missing_an_objective_are_never_on_the_front():
    trials = pd.DataFrame({"train_loss": [1.0, 2.0, 0.5], "kl": [0.5, 0.1, np.nan]})
    assert on_front(trials, parse_objectives("train_loss:min,kl:min")).tolist() == [True, True, False]


@pytest.mark.parametrize("spec, message", [
    ("train_loss", "not COLUMN:min or COLUMN:max"),
    ("train_loss:low,kl:min", "not COLUMN:min or COLUMN:max"),
    ("train_loss:min", "at least two objectives"),
    ("kl:min,kl:max", "named twice"),
])
def test_bad_objectives_are_explained(spec, message):
    with pytest.raises(AnalysisError, match=message):
        parse_objectives(spec)


@pytest.fixture(scope="module")
def reference():
    return analyse([REFERENCE])


def test_reference_best_quality_is_smol_magpie_with_adafactor(reference):
    quality = reference.presets[0]
    assert quality.name == "best_quality"
    assert (quality.config["dataset"], quality.config["optimizer"]) == ("smol-magpie-ultra", "adafactor")
    assert quality.trial["train_loss"] == pytest.approx(1.267)


def test_reference_targets_front_of_loss_and_kl(reference):
    members = reference.pareto[(reference.pareto["front"] == "loss:min,kl:min")
                               & (reference.pareto["scope"] == "sweep") & (reference.pareto["scope_name"] == "targets")]
    assert set(members["lora_targets"]) == {"hub_oproj", "in_proj", "o_proj", "all_linear"}
    assert set(members["objectives"]) == {"train_loss:min,kl:min"}  # nothing held out: the loss axis is train_loss
    assert not members["within_noise"].any() and not members["noise_known"].any()


def test_reference_dataset_matters_most_with_the_study_numbers(reference):
    top = reference.spreads.iloc[0]
    assert (top["dimension"], top["method"], top["best_value"], top["worst_value"]) == \
        ("dataset", "controlled", "smol-magpie-ultra", "alpaca")
    assert top["ratio"] == pytest.approx(6.07 / 1.27)
    optimizer = reference.spreads.set_index("dimension").loc["optimizer"]
    assert optimizer["difference"] == pytest.approx(0.039)


def test_reference_gets_no_dataset_tiers_and_no_called_wins(reference):
    table = reference.sweep_tables["datasets"].set_index("dataset")
    assert "tier" not in table  # raw training losses of different datasets rank how predictable they are
    assert table.loc["smol-magpie-ultra", "tied_with_best"] == "best"
    assert set(table["tied_with_best"].drop("smol-magpie-ultra")) == {"noise unknown"}
    assert set(reference.spreads["verdict"]) == {"noise unknown"}
    optimizer = reference.spreads.set_index("dimension").loc["optimizer"]
    assert (optimizer["best_value"], optimizer["next_value"]) == ("adafactor", "adamw")
    assert optimizer["gap_to_next"] == pytest.approx(0.005) and optimizer["next_verdict"] == "noise unknown"


def test_reference_efficiency_is_improvement_over_worst_in_sweep_per_million_params(reference):
    targets = reference.done[reference.done["sweep"] == "targets"].set_index("lora_targets")
    assert set(targets["improvement_basis"]) == {"worst_in_sweep"}
    assert targets.loc["o_proj", "efficiency"] == pytest.approx((6.30 - 5.17) / 0.229376)
    assert targets.loc["hub_oproj", "efficiency"] == 0


def test_reference_efficiency_and_surgical_presets_follow_their_rules(reference):
    efficiency, surgical = reference.presets[1], reference.presets[2]
    assert efficiency.trial["trainable_params"] == 212992  # nothing smaller reaches half its sweep's best
    assert efficiency.trial["dataset"] == "smol-magpie-ultra"
    assert (surgical.trial["lora_targets"], surgical.trial["kl"]) == ("in_proj", 0.051)


def test_stricter_fraction_changes_the_surgical_choice():
    strict = analyse([REFERENCE], settings=Settings(rules=PresetRules(surgical_fraction=0.9)))
    assert strict.presets[2].trial["kl"] > 0.051


def _check_preset_file(path: Path, model: str) -> dict:
    text = path.read_text()
    assert text.startswith("# tune_lfm preset")
    config = yaml.safe_load(text)
    assert set(config) <= set(FIELD_NAMES) and config["model"] == model
    for key in ("lora_rank", "max_steps", "num_examples", "seed", "lora_alpha"):
        assert key not in config or type(config[key]) is int
    load_config_file(path)  # the trial's own loader accepts it as is
    return config


def test_cli_on_reference_writes_everything_without_torch_or_ray(tmp_path):
    out = tmp_path / "report"
    script = ("import sys; from tune_lfm.analysis.__main__ import main; "
              f"code = main([{str(REFERENCE)!r}, '--out', {str(out)!r}, '--reference', {str(REFERENCE)!r}]); "
              "assert code == 0, code; "
              "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')); "
              "assert not heavy, heavy")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "dataset mattered most" in run.stdout
    for name in ("report.md", "report.html", "pareto.parquet", "plots/front_loss-kl.png",
                 "plots/front_loss-trainable_params.png", "plots/front_loss-kl-trainable_params.png",
                 "plots/what_mattered.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    presets = {p.stem: _check_preset_file(p, "LiquidAI/LFM2.5-230M") for p in (out / "presets").glob("*.yaml")}
    assert set(presets) == {"best_quality", "best_efficiency", "most_surgical", "combined_not_yet_run"}
    assert "NOT YET RUN" in (out / "presets" / "combined_not_yet_run.yaml").read_text()
    report = (out / "report.md").read_text()
    assert "35 of 35 completed trials match a published configuration" in report
    assert "worst train_loss among completed trials" in report  # the efficiency basis is stated
    critique = report[report.index("## Reading the published study critically"):]
    assert "Datasets are ranked by raw training loss" in critique and "several times more" in critique
    assert "optimizer: adafactor 1.267 against adamw 1.272" in critique and "cannot be called a win" in critique
    assert ("Published best_efficiency (smol-magpie-ultra adafactor lr=2e-4 r=8 hub_oproj steps=300) combines "
            "settings that were never run together in this table; its expected loss 6.3, kl 0.039 are the numbers "
            "of sweep targets: alpaca adamw") in critique
    pareto = pd.read_parquet(out / "pareto.parquet")
    assert {"front", "scope", "scope_name", "trial_id", "train_loss", "kl"} <= set(pareto.columns)


def _synthetic_experiment(directory: Path) -> Path:
    """A tiny two-sweep experiment as the search writes it, with a failed, a diverged and a running trial, and the
    shared default configuration (tg-0) run once for both sweeps."""
    custom = json.dumps({"modules": ["out_proj"], "layers": "hub"})
    rows = [
        ("lr-0", "lr", "completed", None, 1e-4, "hub_all", 3.1, 0.02, 4.0),
        ("lr-1", "lr", "completed", None, 5e-4, "hub_all", 2.8, 0.06, 4.0),
        ("lr-2", "lr", "failed", "RuntimeError: CUDA out of memory", 1e-3, "hub_all", None, None, None),
        ("lr-3", "lr", "diverged", "loss became nan at step 7", 3e-3, "hub_all", 9.5, 0.9, 4.0),
        ("tg-0", "targets", "completed", None, 2e-4, "hub_all", 2.9, 0.05, 4.0),
        ("tg-1", "targets", "completed", None, 2e-4, custom, 2.5, 0.03, 4.0),
        ("tg-2", "targets", "completed", None, 2e-4, "all_linear", 2.6, 0.08, 4.0),
        ("tg-3", "targets", "running", None, 2e-4, "attn", None, None, None),
    ]
    params = {"hub_all": 3328, custom: 1024, "all_linear": 11520, "attn": 7424}
    trials = pd.DataFrame([{
        "trial_id": t, "sweep": s, "sweeps": "targets,lr" if t == "tg-0" else s, "status": st, "error": e,
        "scale": "tiny", "model": "tiny-lfm2",
        "dataset": "alpaca", "optimizer": "adamw", "learning_rate": lr, "lora_rank": 8, "lora_alpha": 16,
        "lora_targets": tg, "max_steps": 2, "num_examples": 16, "seed": 42, "trainable_params": params[tg],
        "total_params": 2_000_000, "train_loss": loss, "eval_loss": None if loss is None else loss + 0.2,
        "base_loss": base, "kl": kl, "tokens_per_s": 900.0,
    } for t, s, st, e, lr, tg, loss, kl, base in rows])
    history = pd.DataFrame([{"trial_id": t, "step": step, "loss": 4.0 - 0.02 * (i + 1) * step,
                             "learning_rate": 2e-4, "tokens_per_s": 900.0}
                            for i, t in enumerate(("lr-0", "lr-1", "tg-0", "tg-1", "tg-2")) for step in range(1, 21)])
    directory.mkdir()
    trials.to_parquet(directory / "trials.parquet")
    history.to_parquet(directory / "history.parquet")
    return directory


def test_cli_on_experiment_directory_with_failures_and_history(tmp_path, capsys):
    experiment = _synthetic_experiment(tmp_path / "exp")
    assert main([str(experiment), "--quiet"]) == 0
    out = experiment / "analysis"
    assert (out / "plots" / "loss_curves.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Trials not counted" in report
    for trial_id, status in (("lr-2", "failed"), ("lr-3", "diverged"), ("tg-3", "running")):
        assert f"| {trial_id} |" in report and status in report
    assert "CUDA out of memory" in report and "tiny scale" in report
    assert "All 5 trials measured held-out numbers" in report
    quality = _check_preset_file(out / "presets" / "best_quality.yaml", "tiny-lfm2")
    assert quality["lora_targets"] == {"modules": ["out_proj"], "layers": "hub"}
    assert (quality["lora_alpha"], quality["num_examples"], quality["seed"]) == (16, 16, 42)
    pareto = pd.read_parquet(out / "pareto.parquet")
    assert not pareto["trial_id"].isin(["lr-2", "lr-3", "tg-3"]).any()
    assert set(pareto["scope"]) == {"sweep", "experiment"}
    experiment_front = pareto[(pareto["scope"] == "experiment")]
    assert not experiment_front.duplicated(["front", "trial_id"]).any()
    assert "| tg-0 | 2e-4 |" in report  # the shared default also appears in the lr sweep's table
    assert "Wrote" in capsys.readouterr().out


def test_custom_objectives_make_their_own_front(tmp_path):
    experiment = _synthetic_experiment(tmp_path / "exp")
    out = tmp_path / "custom"
    assert main([str(experiment), "--out", str(out), "--quiet", "--objectives", "eval_loss:min,tokens_per_s:max"]) == 0
    assert set(pd.read_parquet(out / "pareto.parquet")["front"]) == {"eval_loss:min,tokens_per_s:max"}
    assert (out / "plots" / "front_eval_loss-tokens_per_s.png").is_file()


def test_a_preset_of_a_custom_target_spec_is_a_trial_config_the_trial_command_accepts(tmp_path):
    """best_quality here is the row trained with a JSON target spec: its preset loads as the trial command loads a
    --config and passes the trial command's checks, targeting out_proj on the hub layers (a preset run end to end
    to its recorded numbers: test_quickstart.py)."""
    from tune_lfm.validate import check_trial

    experiment = _synthetic_experiment(tmp_path / "exp")
    assert main([str(experiment), "--quiet"]) == 0
    preset = experiment / "analysis" / "presets" / "best_quality.yaml"
    config = load_config_file(preset)
    check_trial(config, str(preset))
    assert config.model == "tiny-lfm2" and json.loads(config.targets_label()) == {"modules": ["out_proj"],
                                                                                  "layers": "hub"}


def test_comparison_prefers_specific_then_same_sweep_published_rows(tmp_path):
    mine = pd.DataFrame({
        "sweep": ["optimizers", "mine", "mine"], "model": "LiquidAI/LFM2.5-230M",
        "dataset": ["smol-magpie-ultra", "alpaca", "tulu3"], "optimizer": ["adamw", "adamw", "lion"],
        "learning_rate": 2e-4,
        "lora_rank": 8, "lora_targets": "hub_all", "max_steps": 300, "num_examples": [2000, 2000, 9999],
        "trainable_params": [212992, 212992, 1000], "train_loss": [1.372, 6.0, 3.0], "kl": [0.1, 0.1, 0.1],
    })
    mine.to_csv(tmp_path / "mine.csv", index=False)
    comparison = analyse([tmp_path / "mine.csv"], reference=REFERENCE).comparison.set_index("trial_id")
    assert comparison.loc["mine-0", "published_train_loss"] == pytest.approx(1.272)  # optimizers table
    assert comparison.loc["mine-0", "train_loss_delta"] == pytest.approx(0.1)
    assert comparison.loc["mine-1", "published_sweep"] == "duration"  # the row that states num_examples=2000
    assert comparison.loc["mine-1", "published_kl"] == pytest.approx(0.129)
    assert "mine-2" not in comparison.index  # the study never ran tulu3 with lion


def test_alpha_tied_to_rank_is_reported_under_rank_and_kept_paired(tmp_path):
    rows = [("rank", r, 2 * r, 2e-4, 3.0 - 0.1 * r, 0.01 * r) for r in (2, 4, 8)]
    rows += [("lr", 4, 8, lr, loss, 0.05) for lr, loss in ((1e-4, 2.9), (1e-3, 2.2))]
    table = pd.DataFrame(rows, columns=["sweep", "lora_rank", "lora_alpha", "learning_rate", "train_loss", "kl"])
    table["trainable_params"] = table["lora_rank"] * 1000
    table.to_csv(tmp_path / "t.csv", index=False)
    result = analyse([tmp_path / "t.csv"])
    spreads = result.spreads.set_index("dimension")
    assert "lora_alpha" not in spreads.index
    rank = spreads.loc["lora_rank"]
    assert (rank["method"], rank["moved_with_it"]) == ("controlled", "lora_alpha")
    combined = result.presets[-1].config
    assert (combined["lora_rank"], combined["lora_alpha"], combined["learning_rate"]) == (8, 16, 1e-3)


def test_random_search_spreads_are_marked_marginal(tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"sweep": "pareto", "learning_rate": rng.uniform(1e-4, 1e-3, 8),
                          "lora_rank": [2, 4, 8, 16, 4, 8, 16, 2], "optimizer": ["adamw", "lion"] * 4,
                          "train_loss": rng.uniform(1, 3, 8), "kl": rng.uniform(0, 1, 8),
                          "trainable_params": rng.integers(1000, 9000, 8)})
    table.to_csv(tmp_path / "t.csv", index=False)
    spreads = analyse([tmp_path / "t.csv"]).spreads
    assert set(spreads["dimension"]) == {"learning_rate", "lora_rank", "optimizer"}
    assert set(spreads["method"]) == {"marginal"}


def test_single_trial_gets_no_efficiency_preset_and_says_why(tmp_path):
    table = _write(tmp_path / "one.csv", "train_loss,kl,trainable_params\n2.0,0.1,100\n")
    assert main([str(table), "--quiet"]) == 0
    out = tmp_path / "one_analysis"
    assert sorted(p.stem for p in (out / "presets").glob("*.yaml")) == \
        ["best_quality", "combined_not_yet_run"]
    report = (out / "report.md").read_text()
    assert "no trial improved on its sweep's reference" in report
    assert set(pd.read_parquet(out / "pareto.parquet")["scope"]) == {"sweep"}  # one sweep: no experiment scope


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: _write(d / "t.csv", "sweep,train_loss\nx,1.0\n"), r"t.csv: missing column\(s\) kl, trainable_params"),
    (lambda d: _write(d / "t.csv", ""), r"t.csv: the file is empty"),
    (lambda d: _write(d / "t.csv", "train_loss,kl,trainable_params\n"), r"t.csv: holds no trials \(0 rows\)"),
    (lambda d: _write(d / "t.csv", "train_loss,kl,trainable_params\n1.0,abc,5\n"), r"column kl must hold numbers"),
    (lambda d: _write(d / "t.csv", "status,error,train_loss,kl,trainable_params\nfailed,OOM,,,\nfailed,OOM,,,\n"),
     r"none of the 2 trials .* completed .*failed 2.*first error: OOM"),
    (lambda d: (d / "exp").mkdir() or d / "exp", r"exp: not an experiment directory: it has no trials.parquet"),
    (lambda d: _write(d / "t.json", "{}"), r"t.json: unsupported input .json"),
    (lambda d: d / "absent.csv", r"absent.csv: no such file or directory"),
])
def test_malformed_input_gives_a_clear_message(tmp_path, capsys, make, message):
    assert main([str(make(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tune_lfm.analysis: error: ")
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


def test_unknown_objective_column_is_named(tmp_path, capsys):
    assert main([str(REFERENCE), "--out", str(tmp_path), "--objectives", "eval_loss:min,kl:min"]) == 2
    assert "objective 'eval_loss' is not a numeric column" in capsys.readouterr().err


def test_same_experiment_twice_is_refused(tmp_path):
    experiment = _synthetic_experiment(tmp_path / "exp")
    with pytest.raises(AnalysisError, match="trial_id 'lr-0' appears more than once"):
        analyse([experiment, experiment / "trials.parquet"])


def test_cli_reads_a_uri_experiment_and_writes_to_a_local_directory(tmp_path):
    experiment = _synthetic_experiment(tmp_path / "exp")
    workdir = tmp_path / "here"
    workdir.mkdir()
    uri = experiment.as_uri()  # file:///.../exp, read through pyarrow's filesystems like s3:// or gs://
    run = subprocess.run([sys.executable, "-m", "tune_lfm.analysis", uri, "--quiet"], cwd=workdir,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = workdir / "analysis-exp"
    assert re.search(rf"^Wrote \d+ files to {re.escape(str(out))}:$", run.stdout, re.MULTILINE), run.stdout
    assert not (experiment / "analysis").exists()
    for name in ("report.md", "pareto.parquet", "plots/front_loss-kl.png", "plots/loss_curves.png"):
        assert (out / name).is_file(), name  # loss curves: history.parquet was found beside trials.parquet
    assert _check_preset_file(out / "presets" / "best_quality.yaml", "tiny-lfm2")["lora_rank"] == 8
    report = (out / "report.md").read_text()
    assert f"Inputs: {uri}/trials.parquet." in report and "| tg-0 | 2e-4 |" in report


def test_a_uri_to_a_csv_is_that_table_named_by_its_stem(tmp_path):
    table = _write(tmp_path / "mine.csv", "train_loss,kl,trainable_params\n2.0,0.1,100\n1.5,0.2,200\n")
    result = analyse([table.as_uri()])
    assert result.data.sources == [table.as_uri()]
    assert set(result.done["sweep"]) == {"mine"} and result.done["train_loss"].tolist() == [2.0, 1.5]


def test_cli_on_a_uri_without_trials_names_it_and_exits_2(tmp_path):
    empty = tmp_path / "not-yet"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    run = subprocess.run([sys.executable, "-m", "tune_lfm.analysis", empty.as_uri()], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert (f"tune_lfm.analysis: error: {empty.as_uri()}: not an experiment directory: it has no trials.parquet "
            "(it holds: notes.txt)") in run.stderr
    assert not (tmp_path / "analysis-not-yet").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: d.as_uri() + "/gone", r"file://.*/gone: no such file or directory"),
    (lambda d: _write(d / "t.parquet", "not parquet").as_uri(), r"file://.*/t.parquet: cannot be read as parquet: "),
    (lambda d: _write(d / "t.csv", "").as_uri(), r"file://.*/t.csv: the file is empty"),
    (lambda d: "nosuch://bucket/exp", r"nosuch://bucket/exp: cannot be accessed: Unrecognized filesystem type"),
    (lambda d: "s3://bucket/exp?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1",  # nothing listens
     r"s3://bucket/exp\?.*: cannot be accessed: .*(connect|Connect)"),
])
def test_unusable_uri_gives_a_clear_message(tmp_path, capsys, make, message):
    assert main([make(tmp_path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


# Trials as the trial code records them: held-out losses and probe losses with standard errors.

MEASURED = dict(status="completed", model="tiny-lfm2", dataset="alpaca", optimizer="adamw", learning_rate=2e-4,
                lora_rank=8, lora_alpha=16, lora_targets="hub_all", max_steps=40, num_examples=64, seed=42,
                trainable_params=4096, total_params=2_000_000, train_loss=3.0, kl=0.01, kl_se=0.001,
                base_loss=4.0, base_loss_se=0.2, eval_loss_se=0.2, improvement_se=0.01, eval_rows=16,
                probe_base_loss=5.0, probe_loss_se=0.2, probe_improvement_se=0.01, probe_improvement=0.05)


def _measured(path: Path, rows: list[dict], drop: tuple[str, ...] = ()) -> Path:
    """A trials.parquet of measured trials; each row gives trial_id, sweep, improvement and what differs."""
    frame = pd.DataFrame([{**MEASURED, **row} for row in rows])
    frame["eval_loss"] = frame["base_loss"] - frame["improvement"]
    frame["probe_loss"] = frame["probe_base_loss"] - frame["probe_improvement"]
    frame.drop(columns=list(drop)).to_parquet(path)
    return path


def test_presets_and_spreads_rank_on_held_out_improvement_not_train_loss(tmp_path):
    rows = [{"trial_id": "lo-train", "sweep": "lr", "learning_rate": 1e-4, "train_loss": 2.0, "improvement": 0.05},
            {"trial_id": "gains", "sweep": "lr", "learning_rate": 5e-4, "train_loss": 2.5, "improvement": 0.30},
            {"trial_id": "mid", "sweep": "lr", "learning_rate": 1e-3, "train_loss": 2.2, "improvement": 0.15}]
    for drop in ((), ("improvement", "improvement_se")):  # the measured column, else base_loss - eval_loss
        result = analyse([_measured(tmp_path / f"t{len(drop)}.parquet", rows, drop)])
        assert set(result.done["improvement_basis"]) == {"held_out"}
        assert result.done.set_index("trial_id")["improvement"].to_dict() == pytest.approx(
            {"lo-train": 0.05, "gains": 0.30, "mid": 0.15})
        quality = result.presets[0]
        assert quality.trial["trial_id"] == "gains" and quality.basis == "held-out improvement"
        spread = result.spreads.set_index("dimension").loc["learning_rate"]
        assert (spread["best_value"], spread["basis"]) == ("5e-4", "held-out improvement")
        assert result.pareto[result.pareto["front"] == "loss:min,kl:min"]["objectives"].iloc[0] == \
            "eval_loss:min,kl:min"
    assert spread["verdict"] == "noise unknown"  # base_loss - eval_loss without improvement_se: no paired error
    measured = analyse([tmp_path / "t0.parquet"]).spreads.set_index("dimension").loc["learning_rate"]
    assert measured["verdict"] == "clear" and measured["difference_se"] == pytest.approx(np.hypot(0.01, 0.01))


def test_datasets_are_ranked_on_the_probe_set_with_their_own_gain_beside(tmp_path):
    rows = [{"trial_id": "easy", "sweep": "datasets", "dataset": "gsm8k", "base_loss": 2.9, "improvement": 0.02,
             "probe_improvement": 0.01},
            {"trial_id": "helps", "sweep": "datasets", "dataset": "alpaca", "base_loss": 4.6, "improvement": 0.30,
             "probe_improvement": 0.20},
            {"trial_id": "some", "sweep": "datasets", "dataset": "dolly", "base_loss": 4.5, "improvement": 0.25,
             "probe_improvement": 0.08}]
    result = analyse([_measured(tmp_path / "d.parquet", rows)])
    assert result.presets[0].trial["dataset"] == "alpaca"  # not gsm8k, whose held-out loss is lowest
    assert result.presets[0].basis == "probe improvement (shared probe set)"
    table = result.sweep_tables["datasets"].set_index("dataset")
    assert table["tier"].to_dict() == {"alpaca": "winner", "dolly": "moderate", "gsm8k": "low"}
    assert {"improvement", "probe_improvement"} <= set(table.columns)
    assert result.spreads.set_index("dimension").loc["dataset", "basis"] == "probe improvement (shared probe set)"
    front = result.pareto[(result.pareto["front"] == "loss:min,kl:min") & (result.pareto["scope"] == "sweep")]
    assert set(front["objectives"]) == {"probe_loss:min,kl:min"}
    out = tmp_path / "out"
    write_outputs(result, out)
    assert "Ranked on probe improvement (shared probe set)" in (out / "report.md").read_text()

    without_probe = analyse([_measured(tmp_path / "n.parquet", rows, drop=("probe_improvement", "probe_loss"))])
    assert without_probe.presets[0].basis == "held-out improvement on different rows"
    assert "each scored on its own held-out rows" in without_probe.presets[0].reason


TIES = [  # one dataset, improvement_se 0.01: gaps up to 2 x sqrt(2) x 0.01 = 0.028 are ties
    {"trial_id": "t-hub", "sweep": "targets", "lora_targets": "hub_all", "improvement": 0.200, "kl": 0.020,
     "trainable_params": 4000},
    {"trial_id": "t-all", "sweep": "targets", "lora_targets": "all_linear", "improvement": 0.210, "kl": 0.050,
     "trainable_params": 12000},
    {"trial_id": "t-attn", "sweep": "targets", "lora_targets": "attn", "improvement": 0.195, "kl": 0.021,
     "trainable_params": 4500},
    {"trial_id": "t-o", "sweep": "targets", "lora_targets": "o_proj", "improvement": 0.100, "kl": 0.030,
     "trainable_params": 3000},
    {"trial_id": "o-adamw", "sweep": "optimizers", "lora_targets": "hub_all", "improvement": 0.200, "kl": 0.020,
     "trainable_params": 4000},
    {"trial_id": "o-lion", "sweep": "optimizers", "optimizer": "lion", "lora_targets": "hub_all",
     "improvement": 0.190, "kl": 0.040, "trainable_params": 4000},
]


@pytest.fixture(scope="module")
def ties(tmp_path_factory):
    return analyse([_measured(tmp_path_factory.mktemp("ties") / "t.parquet", TIES)])


def test_ties_are_marked_in_sweep_tables(ties):
    marks = ties.sweep_tables["targets"].set_index("trial_id")["tied_with_best"].to_dict()
    assert marks == {"t-all": "best", "t-hub": "yes", "t-attn": "yes", "t-o": "no"}


def test_a_trial_dominated_only_within_noise_stays_on_the_front(ties):
    front = ties.pareto[(ties.pareto["front"] == "loss:min,kl:min") & (ties.pareto["scope_name"] == "targets")]
    members = front.set_index("trial_id")["within_noise"].to_dict()
    assert members == {"t-hub": False, "t-all": False, "t-attn": True}  # t-o is clearly dominated by t-hub
    assert front["noise_known"].all()
    marks = ties.sweep_tables["targets"].set_index("trial_id")["pareto"]
    assert marks["t-attn"].startswith("1=") and "1" not in marks["t-o"].split(",")  # t-o: fewest params, front 2


def test_tied_trials_for_a_preset_are_listed_and_picked_by_the_tie_breakers(ties, tmp_path):
    quality = ties.presets[0]
    assert quality.trial["trial_id"] == "o-adamw"  # tied with t-all; lower kl, fewer params, then trial_id
    assert set(quality.tied) == {"o-adamw", "t-hub", "t-all", "t-attn", "o-lion"}
    assert "tie on improvement within noise" in quality.reason
    # the best score is named as t-all's, not the picked trial's
    assert quality.reason.startswith("trial t-all (sweep targets: all_linear) has the best held-out improvement, 0.21")
    assert "trial o-adamw (sweep optimizers: adamw), at 0.2 ± 0.01, is tied with it within noise" in quality.reason
    write_outputs(ties, tmp_path)
    assert "# Tied for this preset: o-adamw," in (tmp_path / "presets" / "best_quality.yaml").read_text()
    surgical = ties.presets[2]  # kl 0.020 and 0.021 tie (kl_se 0.001): fewer params decides
    assert set(surgical.tied) == {"o-adamw", "t-hub", "t-attn"} and surgical.trial["trainable_params"] == 4000


def test_what_mattered_reports_a_spread_within_noise_with_its_numbers(ties):
    spreads = ties.spreads.set_index("dimension")
    assert spreads.loc["lora_targets", "verdict"] == "clear"
    assert spreads.loc["optimizer", "verdict"] == "within noise"
    assert spreads.loc["optimizer", "difference"] == pytest.approx(0.01)
    headline = what_mattered_most(ties.spreads)
    assert headline.startswith("target modules mattered most")
    assert "Within noise, so not shown to matter: optimizer (held-out improvement 0.2 (adamw) vs 0.19 (lion)" \
        in headline


def test_the_noise_multiplier_changes_what_ties(tmp_path):
    strict = analyse([_measured(tmp_path / "t.parquet", TIES)], settings=Settings(rules=PresetRules(z=0.5)))
    assert strict.sweep_tables["targets"].set_index("trial_id")["tied_with_best"]["t-hub"] == "no"
    assert strict.spreads.set_index("dimension").loc["optimizer", "verdict"] == "clear"


def test_the_tie_rule_is_inclusive_and_unknown_without_errors():
    assert verdict(0.02, 0.01, 2.0) == "within noise" and verdict(0.0201, 0.01, 2.0) == "clear"
    assert verdict(0.5, float("nan"), 2.0) == "noise unknown"
    frame = pd.DataFrame({"kl": [0.10, 0.12, 0.2], "kl_se": [0.005, 0.01, float("nan")]})
    assert ties_with(frame, "kl", 0, 2.0).tolist() == [True, True, None]


def test_bad_noise_z_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(REFERENCE), "--noise-z", "-1"])
    assert exit_info.value.code == 2 and "--noise-z: must be > 0" in capsys.readouterr().err


def test_a_preset_holds_the_full_resolved_config_of_its_trial(tmp_path):
    ran = TrialConfig(model="tiny-lfm2", dataset="alpaca", data_source="embedded", grad_accum=1, max_length=256,
                      eval_examples=16, num_examples=None, max_steps=30, learning_rate=1e-3, lora_rank=4,
                      hub_layers=[1, 3], lora_targets={"modules": ["out_proj"], "layers": "hub"})
    other = ran.replace(lora_rank=2)
    rows = [{**config.to_dict(), "lora_alpha": config.resolved_lora_alpha, "lora_targets": config.targets_label(),
             "trial_id": trial_id, "sweep": "rank", "status": "completed", "scale": "tiny", "lr_multiplier": 5.0,
             "scale_rule": "tiny: lr x5", "trainable_params": 100 * config.lora_rank, "train_loss": 3.0,
             "base_loss": 4.0, "eval_loss": 4.0 - gain, "improvement": gain, "improvement_se": 0.001, "kl": 0.01}
            for trial_id, config, gain in (("best", ran, 0.5), ("worse", other, 0.1))]
    experiment = tmp_path / "exp"
    experiment.mkdir()
    trials_frame(rows).to_parquet(experiment / "trials.parquet")  # nested values stored as JSON text, as sweeps do
    assert main([str(experiment), "--quiet"]) == 0
    path = experiment / "analysis" / "presets" / "best_quality.yaml"
    text = path.read_text()
    assert load_config_file(path) == ran.replace(lora_alpha=8)
    written = yaml.safe_load(text)
    assert written["grad_accum"] == 1 and written["hub_layers"] == [1, 3] and written["num_examples"] is None
    comments = _comments(text)
    assert "trial_id: best" in comments and "lr_multiplier 5" in comments and "improvement 0.5 ± 0.001" in comments


def _comments(text: str) -> str:
    """A preset's comment block as one line (it is wrapped at 116 characters)."""
    return " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))


def test_combined_settings_equal_to_a_measured_trial_say_which_trial(tmp_path):
    rows = [{"trial_id": "base", "sweep": "lr", "sweeps": "lr,rank", "improvement": 0.30},
            {"trial_id": "lr-low", "sweep": "lr", "learning_rate": 1e-4, "improvement": 0.10},
            {"trial_id": "r-4", "sweep": "rank", "lora_rank": 4, "lora_alpha": 8, "improvement": 0.12}]
    result = analyse([_measured(tmp_path / "c.parquet", rows)])
    combined = result.presets[-1]
    assert combined.name == "combined_not_yet_run" and combined.trial["trial_id"] == "base"
    assert combined.reason.startswith("ALREADY MEASURED") and "trial base" in combined.reason
    text = preset_yaml(combined)
    assert "(ALREADY MEASURED as trial base)" in text and "NOT YET RUN" not in text
    assert "improvement 0.3 ± 0.01" in _comments(text)


def test_a_front_whose_objective_does_not_vary_is_drawn_as_a_ranking_with_one_label_per_trial():
    """Ten datasets with one adapter size: a scatter would stack them on one vertical line with overprinted labels."""
    from matplotlib.figure import Figure

    from tune_lfm.analysis.plots import _front_panel

    from tune_lfm.analysis.basis import HELD_OUT_IMPROVEMENT

    trials = pd.DataFrame({"eval_loss": [2.5, 2.1, 2.3], "eval_loss_se": [0.01] * 3, "dataset": ["alpaca"] * 3,
                           "improvement_basis": [HELD_OUT_IMPROVEMENT] * 3, "trainable_params": [26624] * 3,
                           "label": ["lr 1e-4", "lr 5e-4", "lr 2e-4"]})
    front = parse_objectives("loss:min,trainable_params:min")
    axis = Figure().subplots()
    _front_panel(axis, trials, trials.iloc[:0], front, 2.0, "sweep datasets", trials["label"])
    assert [tick.get_text() for tick in axis.get_xticklabels()] == ["lr 5e-4", "lr 2e-4", "lr 1e-4"]
    assert "every trial has trainable_params = 26,624" in axis.get_title()
    assert axis.get_ylabel().startswith("eval_loss")
