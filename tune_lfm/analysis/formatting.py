"""How values look in tables, labels and reports: one place, so the markdown, HTML, stdout and plot labels agree."""

from __future__ import annotations

import json
import math
from numbers import Number

import numpy as np
import pandas as pd

THOUSANDS = ("trainable_params", "total_params", "tokens_trained", "published_params")
PLAIN_INTEGERS = ("lora_rank", "lora_alpha", "max_steps", "num_examples", "seed", "rows_skipped", "n_trials",
                  "eval_rows", "n_values", "n_published")
RATIOS = ("ratio",)
PERCENTAGES = ("relative_gap",)

SHORT_NAMES = {"learning_rate": "lr", "lora_rank": "r", "lora_alpha": "alpha", "max_steps": "steps",
               "num_examples": "n", "seed": "seed"}
"""Numeric settings are labelled `name=value`; text settings (dataset, optimizer, targets) by their value alone."""


def is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def format_value(column: str, value: object) -> str:
    """One cell as text: learning rates in short scientific form, parameter counts with separators, 4 digits else."""
    if is_missing(value):
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if not isinstance(value, Number):
        return str(value)
    if column == "learning_rate":
        return np.format_float_scientific(float(value), trim="-", exp_digits=1, precision=3)
    if column in THOUSANDS:
        return f"{int(round(float(value))):,}"
    if column in PLAIN_INTEGERS and float(value).is_integer():
        return str(int(value))
    if column in RATIOS:
        return f"{float(value):.2f}×"
    if column in PERCENTAGES:
        return f"{float(value):.1%}"
    return f"{float(value):.4g}"


def format_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` with every cell rendered as text by `format_value`."""
    return pd.DataFrame({column: [format_value(column, v) for v in frame[column]] for column in frame.columns},
                        index=frame.index, dtype=object)


def setting_label(row: pd.Series, columns: list[str]) -> str:
    """A trial named by the settings that vary around it, e.g. `hub_oproj` or `steps=1000 n=5000`."""
    parts = []
    for column in columns:
        value = row.get(column)
        if is_missing(value):
            continue
        text = format_value(column, value)
        parts.append(f"{SHORT_NAMES[column]}={text}" if column in SHORT_NAMES else text)
    return " ".join(parts)
