"""From input paths to everything the analysis writes: `analyse` computes, `write_outputs` saves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import pandas as pd

from .compare import compare_with_reference
from .derive import add_derived
from .load import TrialData, expand_sweeps, is_uri, load_trials, split_completed
from .pareto import DEFAULT_FRONTS, Front, check_objectives, front_membership, front_name, pareto_table, resolve
from .plots import plot_fronts, plot_loss_curves, plot_spreads
from .presets import Preset, PresetRules, choose_presets, write_presets
from .report import to_html, to_markdown
from .sections import report_blocks
from .spreads import dimension_spreads
from .tables import DEFAULT_TIER_THRESHOLDS, sweep_table


@dataclass(frozen=True)
class Settings:
    fronts: tuple[Front, ...] = DEFAULT_FRONTS
    rules: PresetRules = PresetRules()
    tier_thresholds: tuple[float, ...] = DEFAULT_TIER_THRESHOLDS

    @property
    def z(self) -> float:
        """The noise multiplier of the tie rule (`noise.py`), shared by tables, fronts, presets and spreads."""
        return self.rules.z


@dataclass
class Analysis:
    data: TrialData
    done: pd.DataFrame
    """Completed trials with derived columns (improvement, efficiency, label); a trial shared by several sweeps
    has one row per sweep (same trial_id)."""
    others: pd.DataFrame
    """Trials that do not count (failed, diverged, running, or without train_loss)."""
    settings: Settings
    pareto: pd.DataFrame
    sweep_tables: dict[str, pd.DataFrame]
    spreads: pd.DataFrame
    presets: list[Preset]
    reference: pd.DataFrame | None = None
    comparison: pd.DataFrame | None = None
    unmatched_reference: int = 0
    files: dict[str, Path] = field(default_factory=dict)


def _front_marks(sweep: pd.DataFrame, fronts: Sequence[Front], z: float) -> pd.Series:
    """Per trial, the numbers (1-based) of the fronts it is on within its sweep, e.g. `1,3`; `3=` where it is on
    front 3 only within noise."""
    marks = pd.Series("", index=sweep.index, dtype=object)
    for number, front in enumerate(fronts, start=1):
        membership = front_membership(sweep, resolve(front, sweep), z)
        for index in sweep.index[membership["member"]]:
            mark = f"{number}=" if membership.at[index, "within_noise"] else str(number)
            marks[index] = f"{marks[index]},{mark}" if marks[index] else mark
    return marks


def analyse(paths: Sequence[str | Path], reference: str | Path | None = None,
            settings: Settings = Settings()) -> Analysis:
    """Load the inputs and compute fronts, tables, spreads, presets and the reference comparison."""
    data = load_trials(paths)
    check_objectives(data.trials, settings.fronts)
    done, others = split_completed(data.trials, data.sources)
    done = add_derived(expand_sweeps(done))
    tables = {str(name): sweep_table(sweep, _front_marks(sweep, settings.fronts, settings.z), settings.z,
                                     settings.tier_thresholds)
              for name, sweep in done.groupby("sweep", sort=False)}
    spreads = dimension_spreads(done, settings.z)
    analysis = Analysis(data, done, others, settings, pareto_table(done, settings.fronts, settings.z), tables,
                        spreads, choose_presets(done, spreads, settings.rules))
    if reference is not None:
        analysis.reference = load_trials([reference]).trials
        analysis.comparison, analysis.unmatched_reference = compare_with_reference(done, analysis.reference)
    return analysis


def default_output(path: str | Path) -> Path:
    """Beside a local input: `<experiment dir>/analysis`, or `<file stem>_analysis` next to a file. A URI's location
    (a bucket) may not be writable from here: `analysis-<its last path component>` in the working directory."""
    if is_uri(path):
        return Path(f"analysis-{PurePosixPath(path).name}").absolute()
    path = Path(path)
    return path / "analysis" if path.is_dir() else path.parent / f"{path.stem}_analysis"


def write_outputs(analysis: Analysis, out: Path) -> dict[str, Path]:
    """Write plots, presets, pareto.parquet, report.md and report.html under `out`; return what was written."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for front, path in zip(analysis.settings.fronts, plot_fronts(analysis.done, analysis.others,
                                                                  list(analysis.settings.fronts), analysis.settings.z,
                                                                  out / "plots")):
        files[f"plot {front_name(front)}"] = path
    for name, path in (("plot spreads", plot_spreads(analysis.spreads, out / "plots" / "what_mattered.png")),
                       ("plot loss curves", plot_loss_curves(analysis.data.history, analysis.done,
                                                             out / "plots" / "loss_curves.png"))):
        if path is not None:
            files[name] = path
    for path in write_presets(analysis.presets, out / "presets"):
        files[f"preset {path.stem}"] = path
    files["pareto"] = out / "pareto.parquet"
    analysis.pareto.to_parquet(files["pareto"], index=False)
    analysis.files = files
    blocks = report_blocks(analysis, out)
    files["report.md"], files["report.html"] = out / "report.md", out / "report.html"
    files["report.md"].write_text(to_markdown(blocks))
    files["report.html"].write_text(to_html(blocks, "tune_lfm analysis"))
    return files


def printable(analysis: Analysis, out: Path) -> str:
    """The report's text without image links, for the terminal."""
    return to_markdown(report_blocks(analysis, out), images=False)
