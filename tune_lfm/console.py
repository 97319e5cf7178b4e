"""What a sweep prints: one line per finished trial as it lands, and the results table at the end.

Rows are trials.parquet rows. A trial is named by the settings that vary across the sweep, so a table of ten
datasets reads as ten dataset names, not ten copies of every setting.
"""

from __future__ import annotations

import math
from typing import Any

from .config import FIELD_NAMES

HIDDEN_SETTINGS = ("user_datasets", "hub_layers", "data_source")
"""Settings that vary only as a consequence of others (a dataset's source, the model's hubs)."""


def varied_settings(rows: list[dict[str, Any]]) -> list[str]:
    return [name for name in FIELD_NAMES if name not in HIDDEN_SETTINGS
            and len({str(row.get(name)) for row in rows}) > 1]


def _with_error(row: dict[str, Any], metric: str) -> str:
    value, error = row.get(metric), row.get(f"{metric}_se")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if error is None or (isinstance(error, float) and math.isnan(error)):
        return f"{value:.4f}"
    return f"{value:.4f}±{error:.4f}"


def trial_label(row: dict[str, Any], varied: list[str]) -> str:
    return " ".join(f"{name}={row.get(name)}" for name in varied) or str(row.get("trial_id"))


def trial_line(row: dict[str, Any], varied: list[str]) -> str:
    """One finished trial: its id, what varies, status and the numbers that rank it."""
    head = f"{row['trial_id']}  {trial_label(row, varied)}  {row.get('status')}"
    if row.get("status") == "failed":
        return f"{head}: {str(row.get('error'))[:160]}"
    return (f"{head}  eval {_with_error(row, 'eval_loss')}  gain {_with_error(row, 'improvement')}  "
            f"kl {_with_error(row, 'kl')}  {row.get('wall_s', math.nan):.0f} s")


def results_table(rows: list[dict[str, Any]]) -> str:
    """Every trial, best held-out loss first (failed ones last), with standard errors."""
    varied = varied_settings(rows)
    ordered = sorted(rows, key=lambda row: (row.get("status") == "failed", _sort_key(row.get("eval_loss"))))
    header = ["trial_id", *varied, "status", "eval_loss", "improvement", "kl", "params", "wall_s"]
    body = [[str(row.get("trial_id")), *(str(row.get(name)) for name in varied), str(row.get("status")),
             _with_error(row, "eval_loss"), _with_error(row, "improvement"), _with_error(row, "kl"),
             _count(row.get("trainable_params")), _count(row.get("wall_s"))] for row in ordered]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def _sort_key(value: Any) -> float:
    return value if isinstance(value, (int, float)) and not math.isnan(value) else math.inf


def _count(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.0f}"
