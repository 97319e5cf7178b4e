"""Quantities computed from the measured columns: improvement, efficiency, share of the model, and trial labels.

Definitions (also stated in every report):

- improvement, in nats per token: the trial's `improvement` column when it has one, else base_loss - eval_loss. Both
  are measured on the same held-out rows of the trial's dataset with the adapter off and on, so it is what training
  gained there (`improvement_basis` = held_out). A trial with neither (the published study) falls back to the worst
  train_loss among the completed trials of its sweep minus its own train_loss: relative within a sweep, the sweep's
  worst trial scores 0, and the rows are training rows (`improvement_basis` = worst_in_sweep).
- efficiency = improvement / (trainable_params / 1e6): improvement per million trainable parameters.
- params_pct = 100 * trainable_params / total_params, where total_params is known.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .basis import HELD_OUT_IMPROVEMENT
from .formatting import setting_label
from .schema import CONFIG_COLUMNS

WORST_IN_SWEEP = "worst_in_sweep"


def varied_columns(frame: pd.DataFrame) -> list[str]:
    """Config columns that take more than one value in `frame` (an empty cell counts as a value of its own)."""
    return [c for c in CONFIG_COLUMNS
            if c in frame and frame[c].notna().any() and frame[c].nunique(dropna=False) > 1]


def _held_out_improvement(frame: pd.DataFrame) -> pd.Series:
    """The measured improvement, else base_loss - eval_loss; NaN where neither is known."""
    missing = pd.Series(np.nan, index=frame.index)
    measured = frame["improvement"] if "improvement" in frame else missing
    derived = frame["base_loss"] - frame["eval_loss"] if {"base_loss", "eval_loss"} <= set(frame) else missing
    return measured.fillna(derived)


def add_derived(done: pd.DataFrame) -> pd.DataFrame:
    """`done` with improvement_basis, improvement, efficiency, params_pct and label columns."""
    frame = done.copy()
    held_out = _held_out_improvement(frame)
    worst = frame.groupby("sweep")["train_loss"].transform("max")
    frame["improvement_basis"] = np.where(held_out.notna(), HELD_OUT_IMPROVEMENT, WORST_IN_SWEEP)
    frame["improvement"] = held_out.fillna(worst - frame["train_loss"])
    millions = frame["trainable_params"].where(frame["trainable_params"] > 0) / 1e6
    frame["efficiency"] = frame["improvement"] / millions
    if "total_params" in frame:
        frame["params_pct"] = 100 * frame["trainable_params"] / frame["total_params"].where(frame["total_params"] > 0)
    frame["label"] = label_by_sweep(frame)
    return frame


def label_by_sweep(frame: pd.DataFrame) -> pd.Series:
    """Each trial named by what varies within its sweep (a sweep of one trial: by what varies across all sweeps,
    else by its trial_id)."""
    labels = pd.Series("", index=frame.index, dtype=object)
    across = varied_columns(frame)
    for _, sweep in frame.groupby("sweep", sort=False):
        columns = varied_columns(sweep) or across
        for index, row in sweep.iterrows():
            labels[index] = setting_label(row, columns) or str(row["trial_id"])
    return labels


def describe_basis(done: pd.DataFrame) -> str:
    """One sentence saying what the improvement and efficiency columns rest on."""
    counts = done.drop_duplicates("trial_id")["improvement_basis"].value_counts()
    held_out, without = int(counts.get(HELD_OUT_IMPROVEMENT, 0)), int(counts.get(WORST_IN_SWEEP, 0))
    if not without:
        return (f"All {held_out} trials measured held-out numbers, so improvement = base_loss - eval_loss on the "
                "same held-out rows (adapter off vs on).")
    text = (f"{without} trial(s) have no held-out numbers (base_loss and eval_loss): their improvement is the worst "
            "train_loss among completed trials of the same sweep minus their own, a training-rows loss that compares "
            "trials within a sweep only (its worst trial scores 0) and cannot separate what training gained from how "
            "predictable the rows are.")
    if held_out:
        text = f"{held_out} trial(s) use improvement = base_loss - eval_loss on held-out rows. " + text
    return text
