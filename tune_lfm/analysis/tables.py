"""One table per sweep: the settings that vary, the measurements with their standard errors, which trials tie with
the best on the sweep's basis (`basis.py`), dataset tiers, and the fronts each trial is on."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .basis import TRAIN_LOSS, Basis, best_position, ranking_basis
from .derive import varied_columns
from .formatting import format_value
from .noise import ties_with
from .schema import CONFIG_COLUMNS

TIER_NAMES = ("winner", "excellent", "good", "moderate", "low")
DEFAULT_TIER_THRESHOLDS = (0.1, 0.35, 0.65)
"""Upper bounds of excellent/good/moderate on the 0 (best) .. 1 (worst) position on the basis; above the last: low."""

DIMENSION_NAMES = {"model": "model", "dataset": "dataset", "optimizer": "optimizer", "learning_rate": "learning rate",
                   "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha", "lora_targets": "target modules",
                   "max_steps": "training steps", "num_examples": "data volume (examples)", "seed": "seed"}

METRIC_COLUMNS = ("train_loss", "eval_loss", "improvement", "improvement_se", "probe_loss", "probe_improvement",
                  "probe_improvement_se", "kl", "kl_se", "trainable_params", "params_pct", "efficiency",
                  "hub_preserved")
BEST, TIED_MARK, BEHIND, UNKNOWN_MARK = "best", "yes", "no", "noise unknown"


def tied_with_best(trials: pd.DataFrame, basis: Basis, z: float) -> pd.Series:
    """`best`, `yes` (tied with it within noise), `no`, or `noise unknown`, per trial, on `basis`."""
    best = best_position(trials[basis.column], basis)
    ties = ties_with(trials, basis.column, best, z)
    marks = ties.map(lambda tie: UNKNOWN_MARK if tie is None else TIED_MARK if tie else BEHIND)
    marks.iloc[best] = BEST
    return marks


def dataset_tiers(scores: pd.Series, ties: pd.Series, basis: Basis,
                  thresholds: Sequence[float] = DEFAULT_TIER_THRESHOLDS) -> pd.Series:
    """Tier by position between the best (0) and worst (1) score on a gain basis; the best and every trial tied with
    it are winners."""
    gains = scores if basis.higher_is_better else -scores
    best, worst = gains.max(), gains.min()
    position = (best - gains) / (best - worst) if best > worst else gains * 0.0
    bins = [-np.inf, 0.0, *thresholds, np.inf]
    tiers = pd.cut(position, bins=bins, labels=list(TIER_NAMES), right=True).astype(object)
    return tiers.where(~ties.isin([BEST, TIED_MARK]), TIER_NAMES[0])


def _sort(table: pd.DataFrame, varied: list[str], basis: Basis) -> pd.DataFrame:
    numeric = varied and all(pd.api.types.is_numeric_dtype(table[c]) for c in varied)
    by = (varied if numeric else []) + [basis.column, "trial_id"]
    ascending = [True] * len(by)
    ascending[-2] = not basis.higher_is_better
    return table.sort_values(by, ascending=ascending, kind="mergesort")


def fixed_settings(sweep: pd.DataFrame) -> str:
    """The settings a sweep holds constant, as `name=value` text for the table caption."""
    constant = [c for c in CONFIG_COLUMNS if c in sweep and sweep[c].notna().any() and c not in varied_columns(sweep)]
    return ", ".join(f"{c}={format_value(c, sweep[c].dropna().iloc[0])}" for c in constant) or "nothing"


def sweep_table(sweep: pd.DataFrame, front_marks: pd.Series, z: float,
                tier_thresholds: Sequence[float] = DEFAULT_TIER_THRESHOLDS) -> pd.DataFrame:
    """A sweep's completed trials: varied settings, metrics, ties with the best, tiers and fronts."""
    varied = varied_columns(sweep)
    basis = ranking_basis(sweep)
    metrics = [c for c in METRIC_COLUMNS if c in sweep and sweep[c].notna().any()]
    table = sweep[["trial_id"] + varied + metrics].copy()
    table["tied_with_best"] = tied_with_best(sweep, basis, z)
    if varied == ["dataset"] and basis is not TRAIN_LOSS:  # raw losses of different datasets make no tiers
        table["tier"] = dataset_tiers(sweep[basis.column], table["tied_with_best"], basis, tier_thresholds)
    table["pareto"] = front_marks.reindex(sweep.index).fillna("")
    return _sort(table, varied, basis).reset_index(drop=True)
