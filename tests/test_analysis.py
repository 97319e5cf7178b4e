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
from tune_lfm.analysis.pipeline import Settings, analyse
from tune_lfm.analysis.presets import PresetRules
from tune_lfm.analysis.schema import CONFIG_COLUMNS, AnalysisError

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
    members = reference.pareto[(reference.pareto["front"] == "train_loss:min,kl:min")
                               & (reference.pareto["scope"] == "sweep") & (reference.pareto["scope_name"] == "targets")]
    assert set(members["lora_targets"]) == {"hub_oproj", "in_proj", "o_proj", "all_linear"}


def test_reference_dataset_matters_most_with_the_study_numbers(reference):
    top = reference.spreads.iloc[0]
    assert (top["dimension"], top["method"], top["best_value"], top["worst_value"]) == \
        ("dataset", "controlled", "smol-magpie-ultra", "alpaca")
    assert top["ratio"] == pytest.approx(6.07 / 1.27)
    optimizer = reference.spreads.set_index("dimension").loc["optimizer"]
    assert optimizer["difference"] == pytest.approx(0.039)


def test_reference_dataset_tiers_follow_the_study(reference):
    table = reference.sweep_tables["datasets"].set_index("dataset")["tier"]
    assert table["smol-magpie-ultra"] == "winner" and table["ultrachat"] == "excellent"
    assert table[["finetome", "magicoder"]].tolist() == ["good", "good"]
    assert table[["tulu3", "openhermes", "slimorca"]].tolist() == ["moderate"] * 3
    assert table[["gsm8k", "dolly", "alpaca"]].tolist() == ["low"] * 3


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
    assert set(config) <= set(CONFIG_COLUMNS) and config["model"] == model
    assert all(v is not None for v in config.values())
    for key in ("lora_rank", "max_steps", "num_examples", "seed", "lora_alpha"):
        assert key not in config or type(config[key]) is int
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
    for name in ("report.md", "report.html", "pareto.parquet", "plots/front_train_loss-kl.png",
                 "plots/front_train_loss-trainable_params.png", "plots/front_train_loss-kl-trainable_params.png",
                 "plots/what_mattered.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    presets = {p.stem: _check_preset_file(p, "LiquidAI/LFM2.5-230M") for p in (out / "presets").glob("*.yaml")}
    assert set(presets) == {"best_quality", "best_efficiency", "most_surgical", "combined_not_yet_run"}
    assert "NOT YET RUN" in (out / "presets" / "combined_not_yet_run.yaml").read_text()
    report = (out / "report.md").read_text()
    assert "35 of 35 completed trials match a published configuration" in report
    assert "worst train_loss among completed trials" in report  # the efficiency basis is stated
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
    assert "All 5 trials have a base_loss" in report
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


def test_presets_validate_with_the_trial_config_loader_when_present(tmp_path):
    config = pytest.importorskip("tune_lfm.config")
    if not hasattr(config, "load_config_file"):
        pytest.skip("tune_lfm.config has no load_config_file")
    experiment = _synthetic_experiment(tmp_path / "exp")
    assert main([str(experiment), "--quiet"]) == 0
    for path in (experiment / "analysis" / "presets").glob("*.yaml"):
        config.load_config_file(path)


@pytest.mark.slow
def test_a_preset_runs_as_is_with_the_trial_command(tmp_path):
    pytest.importorskip("tune_lfm.trial")
    experiment = _synthetic_experiment(tmp_path / "exp")
    assert main([str(experiment), "--quiet"]) == 0
    preset = experiment / "analysis" / "presets" / "best_quality.yaml"
    run = subprocess.run([sys.executable, "-m", "tune_lfm.trial", "--config", str(preset)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["status"] == "completed" and result["model"] == "tiny-lfm2"
    assert json.loads(result["lora_targets"]) == {"modules": ["out_proj"], "layers": "hub"}


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
    assert "no trial improved on its sweep's reference loss" in report
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
    for name in ("report.md", "pareto.parquet", "plots/front_train_loss-kl.png", "plots/loss_curves.png"):
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
