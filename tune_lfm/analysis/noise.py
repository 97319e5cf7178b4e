"""The one rule that decides whether two measured values differ, used by every table, front, preset and spread.

Two trials' values a and b of a metric, with standard errors sa and sb, are *tied* when

    |a - b| <= Z * sqrt(sa**2 + sb**2)            (Z = 2 by default, `--noise-z`)

i.e. when the gap is inside about two standard errors of the difference. A tie is not a claim that the trials are
equal, only that this data cannot order them.

Which standard error belongs to a metric matters more than Z. Trials of one dataset are scored on the same held-out
conversations, and most of the spread of eval_loss between conversations is how hard each conversation is, which both
trials share. improvement = base_loss - eval_loss is measured per conversation with the adapter off and on, so its
standard error (`improvement_se`, paired) leaves that shared difficulty out and is far smaller than eval_loss_se.
Where two trials have the same base_loss (the same rows of the same untuned model), eval_loss_a - eval_loss_b equals
improvement_b - improvement_a exactly, so their eval_loss gap is judged with the improvement standard errors; likewise
probe_loss with probe_improvement_se. sqrt(sa**2 + sb**2) of two paired errors ignores the (usually positive)
covariance between the trials' per-conversation gains, so it errs towards calling a tie, never towards a false win.

Parameter counts are exact (standard error 0). A metric without a standard error (train_loss, every column of the
published study) has unknown noise: comparisons on it are exact and every verdict says "noise unknown".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_Z = 2.0
EXACT = ("trainable_params", "total_params")
PAIRED = {"eval_loss": ("base_loss", "improvement_se", "eval_loss_se"),
          "probe_loss": ("probe_base_loss", "probe_improvement_se", "probe_loss_se")}
"""Loss column -> (reference loss that marks the same rows, paired SE used then, SE used otherwise)."""

TIED, CLEAR, UNKNOWN = "within noise", "clear", "noise unknown"


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    return frame[name].to_numpy(dtype=float) if name in frame else np.full(len(frame), np.nan)


def pair_errors(frame: pd.DataFrame, column: str) -> np.ndarray:
    """n x n standard errors of the difference between every two trials' `column`; NaN where one is unknown."""
    n = len(frame)
    if column in EXACT:
        return np.zeros((n, n))
    if column in PAIRED:
        reference, paired, alone = PAIRED[column]
        ref = _column(frame, reference)
        same_rows = np.isclose(ref[:, None], ref[None, :], rtol=0, atol=1e-9)
        return np.where(same_rows, _combined(_column(frame, paired)), _combined(_column(frame, alone)))
    return _combined(_column(frame, f"{column}_se"))


def _combined(errors: np.ndarray) -> np.ndarray:
    return np.sqrt(errors[:, None] ** 2 + errors[None, :] ** 2)


def known(frame: pd.DataFrame, column: str) -> bool:
    """Whether every pair of trials in `frame` has a standard error for `column`."""
    return bool(len(frame)) and not np.isnan(pair_errors(frame, column)).any()


def verdict(gap: float, error: float, z: float) -> str:
    """`within noise`, `clear` or `noise unknown` for one gap and the standard error of that gap."""
    if error is None or np.isnan(error):
        return UNKNOWN
    return TIED if abs(gap) <= z * error else CLEAR


def ties_with(frame: pd.DataFrame, column: str, position: int, z: float) -> pd.Series:
    """Per trial: True when tied with the trial at `position` (itself included), False when clearly apart, None
    when the noise is unknown."""
    values = _column(frame, column)
    errors = pair_errors(frame, column)[position]
    out = [None if np.isnan(e) else bool(abs(v - values[position]) <= z * e) for v, e in zip(values, errors)]
    out[position] = True
    return pd.Series(out, index=frame.index, dtype=object)


def mean_error(errors: pd.Series) -> float:
    """Standard error of the mean of independent values with these errors (NaN if any is unknown)."""
    errors = errors.astype(float)
    return float(np.sqrt((errors ** 2).sum()) / len(errors)) if errors.notna().all() and len(errors) else np.nan
