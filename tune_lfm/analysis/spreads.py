"""What mattered most: the spread each setting causes, on the basis its comparison allows, and whether it is noise.

For a setting D it looks for trials that differ only in D (same sweep, every other setting equal, except an alpha
that moved one-for-one with the rank, as the trial's default alpha = 2 x rank does). Each such group is scored on its
own basis (`basis.py`): held-out improvement when it is one dataset, probe improvement when D is the dataset, train_loss
when nothing held out was measured. The group with the largest difference between the best and worst value of D
speaks for D. Without any controlled group (a random search where everything varies at once) the mean per value of D
over all trials is used instead, marked `marginal`.

The difference between best and worst, and between best and the next value, is judged with `noise.py`'s rule:
`clear`, `within noise` or `noise unknown`. A setting whose spread is within noise did not matter measurably.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .basis import TRAIN_LOSS, ranking_basis
from .derive import varied_columns
from .formatting import format_value, setting_label
from .noise import TIED, mean_error, pair_errors, verdict
from .schema import CONFIG_COLUMNS
from .tables import DIMENSION_NAMES

TIED_SETTINGS = {"lora_rank": ("lora_alpha",)}
"""Settings that may be derived from another (the trial's default alpha is 2 x rank)."""
CONTROLLED = "controlled"
MARGINAL = "marginal"
COLUMNS = ["dimension", "method", "basis", "sweep", "n_values", "best_value", "best_score", "worst_value",
           "worst_score", "difference", "difference_se", "verdict", "next_value", "next_score", "gap_to_next",
           "next_verdict", "ratio", "held_fixed", "moved_with_it", "best_raw"]


def _per_value(trials: pd.DataFrame, dimension: str, column: str) -> pd.DataFrame:
    """Mean score and its standard error per value of `dimension` (each value's trials averaged)."""
    trials = trials.dropna(subset=[dimension])
    own = np.sqrt(np.diag(pair_errors(trials, column)) ** 2 / 2)  # a trial's own SE: the pair (i, i) is sqrt(2) x it
    grouped = trials.assign(_se=own).groupby(dimension)
    return pd.DataFrame({"score": grouped[column].mean(), "se": grouped["_se"].apply(mean_error)})


def _lockstep(sweep: pd.DataFrame, dimension: str) -> list[str]:
    """Settings tied to `dimension` that changed with it one value for one value in this sweep (alpha = 2 x rank)."""
    grouped = sweep.groupby(dimension, dropna=False)
    return [c for c in TIED_SETTINGS.get(dimension, ()) if c in sweep and sweep[c].nunique(dropna=False) > 1
            and grouped[c].nunique(dropna=False).max() == 1]


def _spread_row(dimension: str, group: pd.DataFrame, method: str, sweep: str, fixed: str, moved: list[str],
                z: float) -> dict | None:
    basis = ranking_basis(group)
    values = _per_value(group, dimension, basis.column)
    if len(values) < 2:
        return None
    ordered = values.sort_values("score", ascending=not basis.higher_is_better, kind="mergesort")
    best, following, worst = ordered.iloc[0], ordered.iloc[1], ordered.iloc[-1]
    difference, gap = abs(best.score - worst.score), abs(best.score - following.score)
    ratio = worst.score / best.score if basis is TRAIN_LOSS and best.score > 0 else np.nan
    return {"dimension": dimension, "method": method, "basis": basis.name, "sweep": sweep, "n_values": len(values),
            "best_value": format_value(dimension, ordered.index[0]), "best_score": best.score,
            "worst_value": format_value(dimension, ordered.index[-1]), "worst_score": worst.score,
            "difference": difference, "difference_se": float(np.hypot(best.se, worst.se)),
            "verdict": verdict(difference, np.hypot(best.se, worst.se), z),
            "next_value": format_value(dimension, ordered.index[1]), "next_score": following.score,
            "gap_to_next": gap, "next_verdict": verdict(gap, np.hypot(best.se, following.se), z), "ratio": ratio,
            "held_fixed": fixed, "moved_with_it": ", ".join(moved), "best_raw": ordered.index[0]}


def _controlled_spreads(done: pd.DataFrame, dimension: str, z: float) -> list[dict]:
    candidates = []
    for sweep_name, sweep in done.groupby("sweep", sort=False):
        moved = _lockstep(sweep, dimension)
        keys = [c for c in CONFIG_COLUMNS if c in sweep and c != dimension and c not in moved]
        shown = [c for c in keys if c in varied_columns(done)]
        groups = sweep.groupby(keys, dropna=False, sort=False) if keys else [(None, sweep)]
        for _, group in groups:
            if group[dimension].nunique() < 2:
                continue
            row = _spread_row(dimension, group, CONTROLLED, str(sweep_name), setting_label(group.iloc[0], shown),
                              moved, z)
            if row is not None:
                candidates.append(row)
    return candidates


def dimension_spreads(done: pd.DataFrame, z: float) -> pd.DataFrame:
    """One row per varied setting: its largest spread on its basis, with the noise verdicts; settings whose spread
    is measurable first, then by difference."""
    varied = varied_columns(done)
    tied = {c for d in varied for c in _lockstep(done, d)}  # reported under the setting they follow
    rows = []
    for dimension in (d for d in varied if d not in tied):
        candidates = _controlled_spreads(done, dimension, z)
        if candidates:
            rows.append(max(candidates, key=lambda r: r["difference"]))
        else:
            row = _spread_row(dimension, done.drop_duplicates("trial_id"), MARGINAL, "all sweeps",
                              "nothing: other settings vary too", [], z)
            if row is not None:
                rows.append(row)
    spreads = pd.DataFrame(rows, columns=COLUMNS)
    order = spreads.assign(_noise=spreads["verdict"] == TIED).sort_values(["_noise", "difference"],
                                                                         ascending=[True, False], kind="mergesort")
    return order.drop(columns="_noise").reset_index(drop=True)


def _numbers(row: pd.Series) -> str:
    se = "" if np.isnan(row.difference_se) else f" ± {row.difference_se:.2g}"
    return (f"{row.basis} {row.best_score:.4g} ({row.best_value}) vs {row.worst_score:.4g} ({row.worst_value}), "
            f"{row.difference:.3g}{se} apart")


def what_mattered_most(spreads: pd.DataFrame) -> str:
    """The headline: which setting moved its basis most, with the numbers, and which settings are within noise."""
    if spreads.empty:
        return "No setting varied among the completed trials, so there is no spread to attribute."
    measurable = spreads[spreads["verdict"] != TIED]
    noise = spreads[spreads["verdict"] == TIED]
    text = ""
    if not measurable.empty:
        top = measurable.iloc[0]
        text = (f"{DIMENSION_NAMES[top.dimension]} mattered most: {_numbers(top)} ({top.verdict}; {top.method}, "
                f"sweep {top.sweep}).")
        if len(measurable) > 1:
            second = measurable.iloc[1]
            text += f" Next is {DIMENSION_NAMES[second.dimension]}: {_numbers(second)} ({second.verdict})."
    if not noise.empty:
        text += " Within noise, so not shown to matter: " + "; ".join(
            f"{DIMENSION_NAMES[row.dimension]} ({_numbers(row)})" for row in noise.itertuples()) + "."
    return text.strip()
