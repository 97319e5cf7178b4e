"""The study's tables: one per sweep with derived columns, dataset tiers, and what mattered most.

"What mattered most" compares the spread of train_loss each setting causes. For a setting D it looks for trials that
differ only in D (same sweep, every other setting equal, except an alpha that moved one-for-one with the rank, as
the trial's default alpha = 2 x rank does) and takes the comparison with the largest worst/best loss ratio. When no
such controlled comparison exists (e.g. a random search where everything varies at once) it falls back to the
spread of the mean loss per value of D over all trials, and says so in the `method` column.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .derive import varied_columns
from .formatting import format_value, setting_label
from .schema import CONFIG_COLUMNS

TIER_NAMES = ("winner", "excellent", "good", "moderate", "low")
DEFAULT_TIER_THRESHOLDS = (0.1, 0.35, 0.65)
"""Upper bounds of excellent/good/moderate on the 0 (best) .. 1 (worst) loss position; above the last: low."""

DIMENSION_NAMES = {"model": "model", "dataset": "dataset", "optimizer": "optimizer", "learning_rate": "learning rate",
                   "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha", "lora_targets": "target modules",
                   "max_steps": "training steps", "num_examples": "data volume (examples)", "seed": "seed"}

TIED_SETTINGS = {"lora_rank": ("lora_alpha",)}
"""Settings that may be derived from another (the trial's default alpha is 2 x rank)."""

METRIC_COLUMNS = ("train_loss", "eval_loss", "kl", "trainable_params", "params_pct", "improvement", "efficiency",
                  "hub_preserved")
CONTROLLED = "controlled"
MARGINAL = "marginal"


def dataset_tiers(loss: pd.Series, thresholds: Sequence[float] = DEFAULT_TIER_THRESHOLDS) -> pd.Series:
    """Tier of each loss by its position between the best (0) and worst (1) of the table; the best is the winner."""
    best, worst = loss.min(), loss.max()
    position = (loss - best) / (worst - best) if worst > best else loss * 0.0
    bins = [-np.inf, 0.0, *thresholds, np.inf]
    return pd.cut(position, bins=bins, labels=list(TIER_NAMES), right=True).astype(object)


def _sort(table: pd.DataFrame, varied: list[str]) -> pd.DataFrame:
    numeric = varied and all(pd.api.types.is_numeric_dtype(table[c]) for c in varied)
    return table.sort_values((varied if numeric else []) + ["train_loss", "trial_id"], kind="mergesort")


def fixed_settings(sweep: pd.DataFrame) -> str:
    """The settings a sweep holds constant, as `name=value` text for the table caption."""
    constant = [c for c in CONFIG_COLUMNS if c in sweep and sweep[c].notna().any() and c not in varied_columns(sweep)]
    return ", ".join(f"{c}={format_value(c, sweep[c].dropna().iloc[0])}" for c in constant) or "nothing"


def sweep_table(sweep: pd.DataFrame, front_marks: pd.Series,
                tier_thresholds: Sequence[float] = DEFAULT_TIER_THRESHOLDS) -> pd.DataFrame:
    """A sweep's completed trials: its varied settings, the metrics, derived columns and the fronts each is on."""
    varied = varied_columns(sweep)
    metrics = [c for c in METRIC_COLUMNS if c in sweep and sweep[c].notna().any()]
    table = sweep[["trial_id"] + varied + metrics].copy()
    if varied == ["dataset"]:
        table["tier"] = dataset_tiers(sweep["train_loss"], tier_thresholds)
    table["pareto"] = front_marks.reindex(sweep.index).fillna("")
    return _sort(table, varied).reset_index(drop=True)


def _mean_loss_by_value(trials: pd.DataFrame, dimension: str) -> pd.Series:
    return trials.dropna(subset=[dimension]).groupby(dimension)["train_loss"].mean()


def _lockstep(sweep: pd.DataFrame, dimension: str) -> list[str]:
    """Settings tied to `dimension` that changed with it one value for one value in this sweep (alpha = 2 x rank)."""
    grouped = sweep.groupby(dimension, dropna=False)
    return [c for c in TIED_SETTINGS.get(dimension, ()) if c in sweep and sweep[c].nunique(dropna=False) > 1
            and grouped[c].nunique(dropna=False).max() == 1]


def _controlled_spreads(done: pd.DataFrame, dimension: str) -> list[dict]:
    candidates = []
    for sweep_name, sweep in done.groupby("sweep", sort=False):
        moved = _lockstep(sweep, dimension)
        keys = [c for c in CONFIG_COLUMNS if c in sweep and c != dimension and c not in moved]
        shown = [c for c in keys if c in varied_columns(done)]
        groups = sweep.groupby(keys, dropna=False, sort=False) if keys else [(None, sweep)]
        for _, group in groups:
            means = _mean_loss_by_value(group, dimension)
            if len(means) >= 2:
                fixed = setting_label(group.iloc[0], shown)
                candidates.append(_spread_row(dimension, means, CONTROLLED, str(sweep_name), fixed, moved))
    return candidates


def _spread_row(dimension: str, means: pd.Series, method: str, sweep: str, fixed: str, moved: list[str]) -> dict:
    best_value, worst_value = means.idxmin(), means.idxmax()
    best, worst = means[best_value], means[worst_value]
    return {"dimension": dimension, "method": method, "sweep": sweep, "n_values": len(means),
            "best_value": format_value(dimension, best_value), "best_loss": best,
            "worst_value": format_value(dimension, worst_value), "worst_loss": worst,
            "ratio": worst / best if best > 0 else np.nan, "difference": worst - best,
            "held_fixed": fixed, "moved_with_it": ", ".join(moved), "best_raw": best_value}


def dimension_spreads(done: pd.DataFrame) -> pd.DataFrame:
    """One row per varied setting: its largest loss spread (ratio worst/best and difference), largest first."""
    varied = varied_columns(done)
    tied = {c for d in varied for c in _lockstep(done, d)}  # reported under the setting they follow
    rows = []
    for dimension in (d for d in varied if d not in tied):
        candidates = _controlled_spreads(done, dimension)
        if candidates:
            rows.append(max(candidates, key=lambda r: (r["ratio"], r["difference"])))
        else:
            each_once = done.drop_duplicates("trial_id")
            rows.append(_spread_row(dimension, _mean_loss_by_value(each_once, dimension), MARGINAL, "all sweeps",
                                    "nothing: other settings vary too", []))
    columns = ["dimension", "method", "sweep", "n_values", "best_value", "best_loss", "worst_value", "worst_loss",
               "ratio", "difference", "held_fixed", "moved_with_it", "best_raw"]
    spreads = pd.DataFrame(rows, columns=columns)
    return spreads.sort_values(["ratio", "difference"], ascending=False, kind="mergesort").reset_index(drop=True)


def what_mattered_most(spreads: pd.DataFrame) -> str:
    """The headline sentence: which setting moved train_loss most, with its numbers and the runner-up's."""
    if spreads.empty:
        return "No setting varied among the completed trials, so there is no spread to attribute."
    top = spreads.iloc[0]
    text = (f"{DIMENSION_NAMES[top.dimension]} mattered most: train_loss {top.best_loss:.4g} ({top.best_value}) "
            f"to {top.worst_loss:.4g} ({top.worst_value}), {top.ratio:.2f}× and {top.difference:.3g} apart "
            f"({top.method}, sweep {top.sweep}).")
    if len(spreads) > 1:
        second = spreads.iloc[1]
        text += (f" Next is {DIMENSION_NAMES[second.dimension]} at {second.ratio:.2f}× ({second.difference:.3g} "
                 f"apart): by difference the top spread is {top.difference / second.difference:.1f}× the next."
                 if second.difference > 0 else f" Next is {DIMENSION_NAMES[second.dimension]}, with no spread.")
    return text
