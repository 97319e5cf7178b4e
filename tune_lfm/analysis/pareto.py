"""Pareto fronts over any numeric objectives, each minimised or maximised, with their noise.

A trial is on the exact front when no other trial is at least as good in every objective and strictly better in one,
so exact duplicates stay on it together. Measurements are noisy, so a trial dominated only within noise stays too:
it leaves the front only when another trial dominates it and is better by more than the noise (`noise.py`'s rule) in
at least one objective. Such a trial is marked `within_noise`. Where an objective has no standard error its
comparisons are exact and the front says the noise is unknown.

The objective `loss` stands for the quality axis of the scope's basis (`basis.py`): eval_loss within one dataset,
probe_loss across datasets, train_loss when nothing held out was measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from .basis import ranking_basis
from .noise import pair_errors
from .schema import AnalysisError

SENSES = ("min", "max")
EXPERIMENT = "experiment"
SWEEP = "sweep"
QUALITY = "loss"


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
    if any(o.column == QUALITY and o.sense != "min" for o in objectives):
        raise AnalysisError(f"--objectives {spec!r}: {QUALITY} (the scope's loss basis) can only be minimised")
    columns = [o.column for o in objectives]
    if len(set(columns)) != len(columns):
        raise AnalysisError(f"--objectives {spec!r}: a column is named twice")
    if len(objectives) < 2:
        raise AnalysisError(f"--objectives {spec!r}: a Pareto front needs at least two objectives")
    return tuple(objectives)


DEFAULT_FRONTS = tuple(parse_objectives(s) for s in (
    "loss:min,kl:min", "loss:min,trainable_params:min", "loss:min,kl:min,trainable_params:min"))


def front_name(front: Front) -> str:
    return ",".join(map(str, front))


def check_objectives(trials: pd.DataFrame, fronts: Sequence[Front]) -> None:
    numeric = [c for c in trials.columns if pd.api.types.is_numeric_dtype(trials[c])]
    for front in fronts:
        for objective in front:
            if objective.column != QUALITY and objective.column not in numeric:
                raise AnalysisError(f"objective {objective.column!r} is not a numeric column of the trials; "
                                    f"numeric columns: {', '.join(numeric)}")


def resolve(front: Front, trials: pd.DataFrame) -> Front:
    """`front` with the `loss` objective replaced by the quality axis of these trials' basis."""
    quality = Objective(*ranking_basis(trials).front)
    return tuple(quality if o.column == QUALITY else o for o in front)


def _costs(values: np.ndarray, senses: Sequence[str]) -> np.ndarray:
    return np.asarray(values, dtype=float) * np.array([1.0 if s == "min" else -1.0 for s in senses])


def pareto_mask(values: np.ndarray, senses: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of `values` (rows: points, columns: objectives in `senses`)."""
    costs = _costs(values, senses)
    keep = np.ones(len(costs), dtype=bool)
    for i, point in enumerate(costs):
        no_worse = np.all(costs <= point, axis=1)
        better = np.any(costs < point, axis=1)
        keep[i] = not np.any(no_worse & better)
    return keep


def noisy_pareto_mask(values: np.ndarray, senses: Sequence[str], errors: np.ndarray, z: float) -> np.ndarray:
    """Rows no other row dominates by more than the noise in some objective. `errors[k, i, j]`: standard error of
    the difference between rows i and j in objective k (NaN: unknown, compared exactly)."""
    costs = _costs(values, senses)
    margins = z * np.nan_to_num(np.asarray(errors, dtype=float), nan=0.0)
    keep = np.ones(len(costs), dtype=bool)
    for i, point in enumerate(costs):
        no_worse = np.all(costs <= point, axis=1)
        clearly_better = np.any(point - costs > margins[:, i, :].T, axis=1)
        keep[i] = not np.any(no_worse & clearly_better)
    return keep


def on_front(trials: pd.DataFrame, front: Front) -> pd.Series:
    """Which trials are on the exact front; trials missing any objective value are never on it."""
    columns = [o.column for o in front]
    usable = trials[columns].notna().all(axis=1)
    mask = pd.Series(False, index=trials.index)
    if usable.any():
        mask[usable] = pareto_mask(trials.loc[usable, columns].to_numpy(), [o.sense for o in front])
    return mask


def front_membership(trials: pd.DataFrame, front: Front, z: float) -> pd.DataFrame:
    """Per trial of a scope (`front` already resolved): `member` (on the front within noise), `within_noise` (a
    member only because the trials dominating it do so within noise) and `noise_known` (every objective of the
    scope has standard errors)."""
    columns = [o.column for o in front]
    usable = trials[columns].notna().all(axis=1)
    exact = on_front(trials, front)
    member = pd.Series(False, index=trials.index)
    known = True
    if usable.any():
        kept = trials[usable]
        errors = np.stack([pair_errors(kept, column) for column in columns])
        known = not np.isnan(errors).any()
        member[usable] = noisy_pareto_mask(kept[columns].to_numpy(), [o.sense for o in front], errors, z)
    return pd.DataFrame({"member": member, "within_noise": member & ~exact, "noise_known": known})


def scopes(done: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(scope kind, name, trials): each sweep, then the whole experiment (each trial once) when there are several."""
    parts = [(SWEEP, str(name), sweep) for name, sweep in done.groupby("sweep", sort=False)]
    if len(parts) > 1:
        parts.append((EXPERIMENT, "all sweeps", done.drop_duplicates("trial_id")))
    return parts


def pareto_table(done: pd.DataFrame, fronts: Sequence[Front], z: float) -> pd.DataFrame:
    """One row per (front, scope, member trial), with the objectives as resolved in that scope, whether the trial
    is there only within noise, and the trial's columns; what pareto.parquet holds."""
    rows = []
    for front in fronts:
        for kind, name, trials in scopes(done):
            resolved = resolve(front, trials)
            membership = front_membership(trials, resolved, z)
            members = trials[membership["member"]]
            rows.append(members.assign(front=front_name(front), scope=kind, scope_name=name,
                                       objectives=front_name(resolved),
                                       within_noise=membership.loc[members.index, "within_noise"],
                                       noise_known=membership["noise_known"].all()))
    table = pd.concat(rows, ignore_index=True)
    leading = ["front", "scope", "scope_name", "objectives", "within_noise", "noise_known"]
    return table[leading + [c for c in table.columns if c not in leading]]
