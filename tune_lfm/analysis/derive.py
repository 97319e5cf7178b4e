"""Quantities computed from the measured columns: improvement, efficiency, share of the model, and trial labels.

Definitions (also stated in every report):

- improvement = reference_loss - train_loss, in nats per token. reference_loss is the trial's `base_loss` (the loss of
  the untuned model on the same dataset's held-out rows) when the trial has one; otherwise it is the worst
  train_loss among the completed trials of the same sweep, so improvement is then relative within a sweep and the
  sweep's worst trial scores 0. Column `improvement_basis` says which one each row used.
- efficiency = improvement / (trainable_params / 1e6): loss improvement per million trainable parameters.
- params_pct = 100 * trainable_params / total_params, where total_params is known.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .formatting import setting_label
from .schema import CONFIG_COLUMNS

BASE_LOSS = "base_loss"
WORST_IN_SWEEP = "worst_in_sweep"


def varied_columns(frame: pd.DataFrame) -> list[str]:
    """Config columns that take more than one value in `frame` (an empty cell counts as a value of its own)."""
    return [c for c in CONFIG_COLUMNS
            if c in frame and frame[c].notna().any() and frame[c].nunique(dropna=False) > 1]


def add_derived(done: pd.DataFrame) -> pd.DataFrame:
    """`done` with reference_loss, improvement_basis, improvement, efficiency, params_pct and label columns."""
    frame = done.copy()
    worst = frame.groupby("sweep")["train_loss"].transform("max")
    has_base = frame[BASE_LOSS].notna() if BASE_LOSS in frame else pd.Series(False, index=frame.index)
    frame["reference_loss"] = frame[BASE_LOSS].where(has_base, worst) if BASE_LOSS in frame else worst
    frame["improvement_basis"] = np.where(has_base, BASE_LOSS, WORST_IN_SWEEP)
    frame["improvement"] = frame["reference_loss"] - frame["train_loss"]
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
    """One sentence saying which reference loss the improvement and efficiency columns rest on."""
    counts = done.drop_duplicates("trial_id")["improvement_basis"].value_counts()
    with_base, without = int(counts.get(BASE_LOSS, 0)), int(counts.get(WORST_IN_SWEEP, 0))
    if not without:
        return f"All {with_base} trials have a base_loss, so improvement = base_loss - train_loss."
    text = (f"{without} trial(s) have no base_loss: their improvement is measured from the worst train_loss among "
            "completed trials of the same sweep, so it compares trials within a sweep only and the worst one scores 0.")
    if with_base:
        text = f"{with_base} trial(s) use improvement = base_loss - train_loss. " + text
    return text
