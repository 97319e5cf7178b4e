"""PNG plots: one figure per Pareto front (a panel per sweep and one for all sweeps), the loss spread per setting,
and loss curves from history.parquet when it exists.

Uses matplotlib's object API with the Agg canvas (no pyplot state, no display needed) and Pillow, which matplotlib
already requires, to shrink the PNGs.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
from matplotlib.figure import Figure

from .pareto import EXPERIMENT, Front, front_membership, front_name, resolve, scopes
from .noise import TIED
from .tables import DIMENSION_NAMES

MAX_LABELLED = 12
"""Panels with at most this many trials label every trial; larger ones label only the front."""
FRONT_COLOUR, OTHER_COLOUR = "tab:red", "0.6"
DPI = 80


def _save(figure: Figure, path: Path) -> None:
    """PNG reduced to a 64-colour palette: plots stay sharp at a third of the size, small enough to commit."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    PIL.Image.open(buffer).convert("RGB").quantize(colors=64).save(path, optimize=True)


def _figure(panels: int, width: float = 5.0, height: float = 4.0) -> tuple[Figure, list]:
    columns = min(3, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[panels:]:
        unused.set_visible(False)
    return figure, axes[:panels]


def file_stem(front: Front) -> str:
    return "front_" + "-".join(o.column for o in front)


def _axis_label(objective) -> str:
    return f"{objective.column} ({'lower' if objective.sense == 'min' else 'higher'} is better)"


def _wide_range(values: pd.Series) -> bool:
    values = values.dropna()
    return not values.empty and values.min() > 0 and values.max() / values.min() > 20


def _sizes(values: pd.Series) -> np.ndarray:
    """Marker areas for a third objective, 20..200 by rank so outliers do not swamp the panel."""
    ranks = values.rank(pct=True).fillna(0.5).to_numpy()
    return 20 + 180 * ranks


def _draw_not_completed(axis, others: pd.DataFrame, x: str, y: str) -> None:
    """Failed/diverged trials with metrics, as crosses, inside the completed trials' range (a diverged loss would
    otherwise squash the panel); those outside are counted in a corner note."""
    if not {x, y} <= set(others.columns):
        return
    measured = others.dropna(subset=[x, y])
    (x0, x1), (y0, y1) = axis.get_xlim(), axis.get_ylim()
    inside = measured[measured[x].between(x0, x1) & measured[y].between(y0, y1)]
    axis.autoscale(False)
    if not inside.empty:
        axis.scatter(inside[x], inside[y], marker="x", color="black", label="not completed")
        for _, row in inside.iterrows():
            axis.annotate(row["status"], (row[x], row[y]), fontsize=7, xytext=(3, -8), textcoords="offset points")
    outside = measured.drop(inside.index)
    if not outside.empty:
        counts = ", ".join(f"{n} {s}" for s, n in outside["status"].value_counts().items())
        axis.text(0.99, 0.99, f"off the axes: {counts}", transform=axis.transAxes, ha="right", va="top", fontsize=7)


def _constant(values: pd.Series) -> bool:
    return values.dropna().nunique() <= 1


def _ranked_panel(axis, trials: pd.DataFrame, front: Front, membership: pd.DataFrame, title: str,
                  labels: pd.Series) -> None:
    """A front where an objective does not vary (every trial has the same adapter size, say): a scatter would stack
    every trial on one vertical line with overprinted labels, so the trials are drawn in order of the objective that
    varies, one labelled tick each."""
    varying = next((o for o in front[:2] if not _constant(trials[o.column])), front[1])
    fixed = [f"{o.column} = {trials[o.column].dropna().iloc[0]:,.6g}" for o in front[:2]
             if o is not varying and not trials[o.column].dropna().empty]
    ordered = trials.sort_values(varying.column, ascending=varying.sense == "min")
    members = membership.loc[ordered.index, "member"].to_numpy()
    positions = np.arange(len(ordered))
    axis.scatter(positions[~members], ordered[varying.column][~members], color=OTHER_COLOUR, label="completed")
    axis.scatter(positions[members], ordered[varying.column][members], color=FRONT_COLOUR, edgecolor="black",
                 zorder=3, label="Pareto front")
    axis.set_xticks(positions, [labels[i] for i in ordered.index], rotation=45, ha="right", fontsize=7)
    axis.set_xlabel("trials, best first")
    axis.set_ylabel(_axis_label(varying))
    axis.set_title(f"{title}; every trial has {', '.join(fixed)}", fontsize=9)
    axis.grid(alpha=0.3)


def _front_panel(axis, trials: pd.DataFrame, others: pd.DataFrame, front: Front, z: float, title: str,
                 labels: pd.Series):
    front = resolve(front, trials)
    x, y = front[0].column, front[1].column
    membership = front_membership(trials, front, z)
    if _constant(trials[x]) or _constant(trials[y]):
        _ranked_panel(axis, trials, front, membership, title, labels)
        return
    members, loose = membership["member"], membership["within_noise"]
    exact = members & ~loose
    sizes = _sizes(trials[front[2].column]) if len(front) > 2 else np.full(len(trials), 40.0)
    axis.scatter(trials[x], trials[y], s=sizes, color=OTHER_COLOUR, alpha=0.7, label="completed")
    axis.scatter(trials.loc[exact, x], trials.loc[exact, y], s=sizes[exact.to_numpy()], color=FRONT_COLOUR,
                 edgecolor="black", zorder=3, label="Pareto front")
    if loose.any():
        axis.scatter(trials.loc[loose, x], trials.loc[loose, y], s=sizes[loose.to_numpy()], facecolor="none",
                     edgecolor=FRONT_COLOUR, linewidth=1.5, zorder=3, label=f"dominated only within noise (Z={z:g})")
    if len(front) == 2:
        path = trials[exact].sort_values([x, y])
        axis.plot(path[x], path[y], color=FRONT_COLOUR, linewidth=1, zorder=2)
    label_all = len(trials) <= MAX_LABELLED
    for position, (index, row) in enumerate(trials.sort_values(x).iterrows()):
        if members[index] or label_all:  # staggered heights keep neighbours' labels apart
            axis.annotate(labels[index], (row[x], row[y]), fontsize=7, xytext=(4, 3 + 8 * (position % 3)),
                          textcoords="offset points", color="black" if members[index] else "0.4")
    for column, setter in ((x, axis.set_xscale), (y, axis.set_yscale)):
        if column == "trainable_params" or _wide_range(trials[column]):
            setter("log")
    axis.margins(x=0.12, y=0.08)
    _draw_not_completed(axis, others, x, y)
    axis.set_xlabel(_axis_label(front[0]))
    axis.set_ylabel(_axis_label(front[1]))
    suffix = f"; marker size: {front[2].column}" if len(front) > 2 else ""
    noise = "" if membership["noise_known"].all() else "; noise unknown"
    axis.set_title(title + suffix + noise, fontsize=9)
    axis.grid(alpha=0.3)


def plot_fronts(done: pd.DataFrame, others: pd.DataFrame, fronts: list[Front], z: float,
                directory: Path) -> list[Path]:
    """One PNG per front; every trial drawn, the front highlighted and labelled by what varied in its sweep."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for front in fronts:
        parts = scopes(done)
        figure, axes = _figure(len(parts))
        for axis, (kind, name, trials) in zip(axes, parts):
            in_scope = others if kind == EXPERIMENT else others[others["sweep"] == name]
            labels = (trials["sweep"] + ": " + trials["label"]) if kind == EXPERIMENT else trials["label"]
            _front_panel(axis, trials, in_scope, front, z, f"{kind} {name}" if kind != EXPERIMENT else name, labels)
        axes[0].legend(fontsize=7, loc="best")
        figure.suptitle(f"Pareto front: {front_name(front)}")
        path = directory / f"{file_stem(front)}.png"
        _save(figure, path)
        written.append(path)
    return written


def plot_spreads(spreads: pd.DataFrame, path: Path) -> Path | None:
    """Horizontal bars: the best-to-worst difference each setting caused on its basis, with two standard errors of
    that difference as an error bar where known; settings within noise are drawn pale."""
    if spreads.empty:
        return None
    ordered = spreads.iloc[::-1]
    figure = Figure(figsize=(9, 0.5 * len(ordered) + 1.5), layout="constrained")
    axis = figure.subplots()
    names = [DIMENSION_NAMES[d] for d in ordered["dimension"]]
    colours = ["0.75" if v == TIED else "tab:blue" for v in ordered["verdict"]]
    errors = (2 * ordered["difference_se"]).fillna(0).to_numpy()
    axis.barh(names, ordered["difference"], color=colours, xerr=errors, capsize=3)
    for i, row in enumerate(ordered.itertuples()):
        axis.annotate(f"  {row.best_value} {row.best_score:.3g} vs {row.worst_value} {row.worst_score:.3g} "
                      f"({row.verdict})", (row.difference, i), va="center", fontsize=7)
    axis.set_xlim(0, max(ordered["difference"].max(), 1e-9) * 2.2)
    axis.set_xlabel("best-to-worst difference (nats) on: " + "; ".join(ordered["basis"].unique()), fontsize=8)
    axis.set_title("What mattered most: spread per setting (pale: within noise)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(figure, path)
    return path


def plot_loss_curves(history: pd.DataFrame | None, done: pd.DataFrame, path: Path) -> Path | None:
    """Training loss per step, a panel per sweep, for completed trials that have a history."""
    if history is None:
        return None
    history = history[history["trial_id"].isin(done["trial_id"])]
    if history.empty:
        return None
    sweeps = [(name, sweep) for name, sweep in done.groupby("sweep", sort=False)
              if sweep["trial_id"].isin(history["trial_id"]).any()]
    figure, axes = _figure(len(sweeps))
    for axis, (name, sweep) in zip(axes, sweeps):
        for _, trial in sweep.iterrows():
            steps = history[history["trial_id"] == trial["trial_id"]].sort_values("step")
            if not steps.empty:
                axis.plot(steps["step"], steps["loss"], linewidth=1, label=trial["label"])
        if len(sweep) <= MAX_LABELLED:
            axis.legend(fontsize=7)
        axis.set_title(f"sweep {name}", fontsize=9)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.grid(alpha=0.3)
    figure.suptitle("Loss curves (history.parquet)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(figure, path)
    return path
