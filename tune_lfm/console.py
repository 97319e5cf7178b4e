"""What a sweep prints: one line per finished trial as it lands, a live table of the running ones on a terminal, and
the results table at the end.

Rows are trials.parquet rows. A trial is named by the settings that vary across the sweep, so a table of ten
datasets reads as ten dataset names, not ten copies of every setting.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, TextIO

from .config import FIELD_NAMES
from .progress import format_duration

HIDDEN_SETTINGS = ("user_datasets", "hub_layers", "data_source")
"""Settings that vary only as a consequence of others (a dataset's source, the model's hubs)."""


def log(message: str) -> None:
    """A line for the person watching the driver (stderr; stdout holds results), above the live table if one is
    drawn."""
    table = LiveTable.active
    if table is not None:
        table.erase()
    print(f"[tune_lfm] {message}", file=sys.stderr, flush=True)
    if table is not None:
        table.draw(force=True)


class LiveTable:
    """The running trials of a sweep, redrawn in place under the log lines on a terminal: id, what varies, status,
    step/total, loss, tokens/s and time left. Into a file or a pipe it draws nothing: the line each finished trial
    gets says it all, and logs stay short."""

    active: LiveTable | None = None
    """The table `log` keeps its lines above."""

    def __init__(self, varied: list[str], stream: TextIO | None = None, min_interval_s: float = 0.5):
        self.varied, self.stream, self.min_interval_s = varied, stream or sys.stderr, min_interval_s
        self.enabled = self.stream.isatty()
        self.rows: dict[str, dict[str, str]] = {}
        self.drawn_lines = 0
        self.drawn_at = 0.0

    def __enter__(self) -> LiveTable:
        LiveTable.active = self if self.enabled else None
        return self

    def __exit__(self, *exc) -> None:
        self.erase()
        LiveTable.active = None

    def start(self, trial_id: str, config: dict[str, Any], status: str = "starting") -> None:
        label = " ".join(str(config.get(name)) for name in self.varied) or trial_id
        self.rows[trial_id] = {"trial_id": trial_id, "label": label, "status": status,
                               "step": f"0/{config['max_steps']}", "loss": "-", "tok/s": "-", "ETA": "?"}
        self.draw(force=True)

    def step(self, trial_id: str, config: dict[str, Any], step: dict[str, Any]) -> None:
        if trial_id not in self.rows:
            self.start(trial_id, config)
        done, total, elapsed = step["step"], config["max_steps"], step.get("elapsed_s", 0.0)
        left = elapsed / done * (total - done) if done else math.nan
        status = "measuring" if done >= total else "running"  # held-out loss, KL and the hub check come next
        self.rows[trial_id].update(status=status, step=f"{done}/{total}", loss=f"{step['loss']:.4f}",
                                   ETA=format_duration(left) if done else "?",
                                   **{"tok/s": f"{step.get('tokens_per_s', 0):,.0f}"})
        self.draw()

    def finish(self, trial_id: str) -> None:
        """The trial's own line is printed above; it leaves the table."""
        self.rows.pop(trial_id, None)
        self.draw(force=True)

    def erase(self) -> None:
        if self.enabled and self.drawn_lines:
            self.stream.write("\x1b[1A\x1b[2K" * self.drawn_lines)
            self.stream.flush()
            self.drawn_lines = 0

    def draw(self, force: bool = False) -> None:
        if not self.enabled or (not force and time.monotonic() - self.drawn_at < self.min_interval_s):
            return
        self.erase()
        if self.rows:
            header = ["trial_id", " ".join(self.varied) or "trial", "status", "step", "loss", "tok/s", "ETA"]
            body = [[row["trial_id"], row["label"], row["status"], row["step"], row["loss"], row["tok/s"], row["ETA"]]
                    for row in self.rows.values()]
            lines = _columns(header, body)
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
            self.drawn_lines = len(lines)
        self.drawn_at = time.monotonic()


class _FirstSlowWarningOnly(logging.Filter):
    """Passes Tune's first slow-operation warning and drops the later ones; other records pass."""

    def __init__(self):
        super().__init__()
        self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "performance bottleneck" not in record.getMessage():
            return True
        first, self.shown = not self.shown, True
        return first


def show_first_slow_warning_only() -> None:
    """Once the machine is busy, Tune warns at every result that its callbacks took over half a second, four lines
    each time, with nothing new to act on; the quiet console keeps the first (`--verbose` shows them all)."""
    tune_util = logging.getLogger("ray.tune.utils.util")
    if not any(isinstance(existing, _FirstSlowWarningOnly) for existing in tune_util.filters):
        tune_util.addFilter(_FirstSlowWarningOnly())


def quiet_libraries() -> None:
    """What the driver's libraries print that the quiet console leaves out (`--verbose` keeps it all); settings the
    user made in the environment win. Tune: a warning at every adapter checkpoint that snapshots came close
    together, an experiment box on stdout from its newer console (the classic one prints nothing at verbosity 0),
    its slow-operation warnings after the first. transformers: weight-loading progress bars. MLflow: its INFO lines
    (database set-up). Warnings of transformers and MLflow still show."""
    from transformers.utils import logging as transformers_logging

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    show_first_slow_warning_only()
    transformers_logging.disable_progress_bar()


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


def trial_line(row: dict[str, Any], varied: list[str]) -> str:
    """One finished trial: its id, what varies (if anything does), status and the numbers that rank it."""
    settings = " ".join(f"{name}={row.get(name)}" for name in varied)
    head = "  ".join(part for part in (row["trial_id"], settings, str(row.get("status"))) if part)
    if row.get("status") == "failed":
        return f"{head}: {str(row.get('error'))[:160]}"
    return (f"{head}  eval {_with_error(row, 'eval_loss')}  gain {_with_error(row, 'improvement')}  "
            f"kl {_with_error(row, 'kl')}  {row.get('wall_s', math.nan):.0f} s")


def results_table(rows: list[dict[str, Any]]) -> str:
    """Every trial, best first (failed ones last), with standard errors. Best is the lowest held-out loss when the
    trials share a dataset; when datasets differ their held-out rows differ too, so the order is the loss on the
    probe set, the same conversations for every trial (as the analysis ranks them)."""
    varied = varied_settings(rows)
    rank_by = "probe_loss" if len({row.get("dataset") for row in rows}) > 1 else "eval_loss"
    ordered = sorted(rows, key=lambda row: (row.get("status") == "failed", _sort_key(row.get(rank_by))))
    header = ["trial_id", *varied, "status", "eval_loss", "improvement", "probe_loss", "kl", "params", "wall_s"]
    body = [[str(row.get("trial_id")), *(str(row.get(name)) for name in varied), str(row.get("status")),
             *(_with_error(row, metric) for metric in ("eval_loss", "improvement", "probe_loss", "kl")),
             _count(row.get("trainable_params")), _count(row.get("wall_s"))] for row in ordered]
    return "\n".join(_columns(header, body))


def _columns(header: list[str], body: list[list[str]]) -> list[str]:
    """Header, rule and rows, each column as wide as its widest cell."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    return [lines[0], "  ".join("-" * width for width in widths), *lines[1:]]


def _sort_key(value: Any) -> float:
    return value if isinstance(value, (int, float)) and not math.isnan(value) else math.inf


def _count(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.0f}"
