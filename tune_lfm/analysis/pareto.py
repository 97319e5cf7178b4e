"""Pareto fronts over any numeric objectives, each minimised or maximised.

A trial is on the front when no other trial is at least as good in every objective and strictly better in one.
So exact duplicates and ties all stay on the front together: neither copy dominates the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from .schema import AnalysisError

SENSES = ("min", "max")
EXPERIMENT = "experiment"
SWEEP = "sweep"


@dataclass(frozen=True)
class Objective:
    column: str
    sense: str

    def __str__(self) -> str:
        return f"{self.column}:{self.sense}"


Front = tuple[Objective, ...]


def parse_objectives(spec: str) -> Front:
    """`train_loss:min,kl:min` -> objectives; errors show the expected syntax."""
    objectives = []
    for part in (p.strip() for p in spec.split(",")):
        column, _, sense = part.partition(":")
        if not column or sense not in SENSES:
            raise AnalysisError(f"--objectives {spec!r}: {part!r} is not COLUMN:min or COLUMN:max "
                                "(example: train_loss:min,kl:min,trainable_params:min)")
        objectives.append(Objective(column.strip(), sense))
    columns = [o.column for o in objectives]
    if len(set(columns)) != len(columns):
        raise AnalysisError(f"--objectives {spec!r}: a column is named twice")
    if len(objectives) < 2:
        raise AnalysisError(f"--objectives {spec!r}: a Pareto front needs at least two objectives")
    return tuple(objectives)


DEFAULT_FRONTS = tuple(parse_objectives(s) for s in (
    "train_loss:min,kl:min", "train_loss:min,trainable_params:min", "train_loss:min,kl:min,trainable_params:min"))


def front_name(front: Front) -> str:
    return ",".join(map(str, front))


def check_objectives(trials: pd.DataFrame, fronts: Sequence[Front]) -> None:
    numeric = [c for c in trials.columns if pd.api.types.is_numeric_dtype(trials[c])]
    for front in fronts:
        for objective in front:
            if objective.column not in numeric:
                raise AnalysisError(f"objective {objective.column!r} is not a numeric column of the trials; "
                                    f"numeric columns: {', '.join(numeric)}")


def pareto_mask(values: np.ndarray, senses: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of `values` (rows: points, columns: objectives in `senses`)."""
    costs = np.asarray(values, dtype=float) * np.array([1.0 if s == "min" else -1.0 for s in senses])
    keep = np.ones(len(costs), dtype=bool)
    for i, point in enumerate(costs):
        no_worse = np.all(costs <= point, axis=1)
        better = np.any(costs < point, axis=1)
        keep[i] = not np.any(no_worse & better)
    return keep


def on_front(trials: pd.DataFrame, front: Front) -> pd.Series:
    """Which trials are on the front; trials missing any objective value are never on it."""
    columns = [o.column for o in front]
    usable = trials[columns].notna().all(axis=1)
    mask = pd.Series(False, index=trials.index)
    if usable.any():
        mask[usable] = pareto_mask(trials.loc[usable, columns].to_numpy(), [o.sense for o in front])
    return mask


def scopes(done: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(scope kind, name, trials): each sweep, then the whole experiment (each trial once) when there are several."""
    parts = [(SWEEP, str(name), sweep) for name, sweep in done.groupby("sweep", sort=False)]
    if len(parts) > 1:
        parts.append((EXPERIMENT, "all sweeps", done.drop_duplicates("trial_id")))
    return parts


def pareto_table(done: pd.DataFrame, fronts: Sequence[Front]) -> pd.DataFrame:
    """One row per (front, scope, member trial), with the trial's columns; what pareto.parquet holds."""
    rows = []
    for front in fronts:
        for kind, name, trials in scopes(done):
            members = trials[on_front(trials, front)]
            rows.append(members.assign(front=front_name(front), scope=kind, scope_name=name))
    table = pd.concat(rows, ignore_index=True)
    leading = ["front", "scope", "scope_name"]
    return table[leading + [c for c in table.columns if c not in leading]]
