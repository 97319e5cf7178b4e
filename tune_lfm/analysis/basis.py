"""Which number a set of trials is ranked on, chosen from what they share.

Losses of different datasets are losses on different rows: a lower eval_loss on gsm8k than on alpaca says gsm8k's
held-out rows are easier to predict, not that training helped more. So a ranking picks its basis from the trials it
ranks:

- all of one dataset, held-out numbers measured: *held-out improvement* (base_loss - eval_loss on the same rows,
  adapter off vs on); fronts use eval_loss, which orders those trials the same way.
- several datasets, every trial with probe numbers: *probe improvement* on the shared probe set (the same
  conversations for every trial); fronts use probe_loss. Each trial's own held-out improvement is shown beside it.
- several datasets without probe numbers: held-out improvement still (a gain, not a raw loss), flagged as measured
  on different rows.
- any trial without held-out numbers (the published study): train_loss, flagged: a training-rows loss that across
  datasets mostly measures how predictable each dataset is.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

HELD_OUT_IMPROVEMENT = "held_out"
"""`improvement_basis` of a trial whose improvement is base_loss - eval_loss (measured or derived)."""


@dataclass(frozen=True)
class Basis:
    name: str
    column: str
    """What rankings order by."""
    sense: str
    front: tuple[str, str]
    """(column, min|max) that fronts put on their quality axis."""
    caveat: str = ""

    @property
    def higher_is_better(self) -> bool:
        return self.sense == "max"


HELD_OUT = Basis("held-out improvement", "improvement", "max", ("eval_loss", "min"))
PROBE = Basis("probe improvement (shared probe set)", "probe_improvement", "max", ("probe_loss", "min"))
DIFFERENT_ROWS = Basis(
    "held-out improvement on different rows", "improvement", "max", ("improvement", "max"),
    "these trials span several datasets, each scored on its own held-out rows, and have no probe_improvement to put "
    "them on common rows: their gains are compared, but the rows differ")
TRAIN_LOSS = Basis(
    "train_loss (no held-out measurements)", "train_loss", "min", ("train_loss", "min"),
    "some or all of these trials have no held-out numbers (base_loss, eval_loss), so only the training-rows loss "
    "orders them; across datasets it measures how predictable each dataset is, not what training gained, and it "
    "has no standard error")


def spans_datasets(trials: pd.DataFrame) -> bool:
    return "dataset" in trials and trials["dataset"].nunique(dropna=False) > 1


def _all_present(trials: pd.DataFrame, column: str) -> bool:
    return column in trials and bool(trials[column].notna().all())


def ranking_basis(trials: pd.DataFrame) -> Basis:
    """The basis on which `trials` can be ranked against each other (see the module doc)."""
    if not (trials["improvement_basis"] == HELD_OUT_IMPROVEMENT).all():
        return TRAIN_LOSS
    if not spans_datasets(trials):
        return HELD_OUT
    return PROBE if _all_present(trials, "probe_improvement") and _all_present(trials, "probe_loss") \
        else DIFFERENT_ROWS


def best_position(values: pd.Series, basis: Basis) -> int:
    """Row position of the best value on the basis (first of equals)."""
    numbers = values.astype(float).reset_index(drop=True)
    return int(numbers.idxmax() if basis.higher_is_better else numbers.idxmin())
