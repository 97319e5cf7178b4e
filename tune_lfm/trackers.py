"""`--log mlflow|tensorboard|wandb`: every trial's step losses and final metrics, streamed by Ray Tune's logger
callbacks (MLflowLoggerCallback, TBXLoggerCallback, WandbLoggerCallback) from the driver.

A trial reports three kinds of results (`kind`: steps, checkpoint, final). Trackers get numbers only, named as in the
experiment's dataframes: each step's row of history.parquet as `step/<column>` at that optimizer step (a `steps`
result holds a second's worth of rows), and the trial's measured metrics (trials.parquet's columns; booleans as 0/1)
at its last step. Config values go in as
parameters (MLflow params, TensorBoard hparams, W&B config), never as metrics.

Where the runs go: MLflow to `MLFLOW_TRACKING_URI` if set, else a SQLite store `mlflow.db` in the experiment
directory (in the working directory when the experiment is on object storage); TensorBoard event files into each
trial's directory of the experiment; W&B to the project named after the sweep, offline when `WANDB_MODE=offline`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from typing import Any

from .config import FIELD_NAMES, ConfigError
from .results import HISTORY_COLUMNS, TRIAL_COLUMNS

TRACKERS = ("mlflow", "tensorboard", "wandb")
STEP_PREFIX = "step/"


def _final_metric_names() -> tuple[str, ...]:
    from .atlas import PRESERVATION_KEYS

    return tuple(c for c in (*TRIAL_COLUMNS, *PRESERVATION_KEYS) if c not in FIELD_NAMES)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def tracked_metrics(result: dict[str, Any]) -> list[dict[str, Any]]:
    """What trackers get from one Tune result: per optimizer step it covers, numeric metrics and
    `training_iteration` = that step (the x axis of every tracker); none for results that carry no metrics of their
    own (resume checkpoints)."""
    if result.get("kind") == "steps":
        names = [(f"{STEP_PREFIX}{c}", c) for c in HISTORY_COLUMNS[2:]]
        rows = [(row, row["step"]) for row in result["steps"]]
    elif result.get("kind") == "final":
        names, rows = [(c, c) for c in _final_metric_names()], [(result, result.get("steps_completed") or 0)]
    else:
        return []
    tracked = []
    for row, step in rows:
        metrics = {name: _number(row.get(key)) for name, key in names}
        tracked.append({**{k: v for k, v in metrics.items() if v is not None}, "training_iteration": int(step)})
    return tracked


class _TrackedMetricsOnly:
    """Hands a Ray logger callback each of `tracked_metrics(result)` instead of the raw result."""

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]):
        for tracked in tracked_metrics(result):
            super().log_trial_result(iteration, trial, tracked)


class _OneMlflowBatchPerResult:
    """MLflowLoggerCallback writes each metric of a result in its own transaction and looks the run up first: with
    the SQLite store, the quickstart sweep's driver spent about 15 CPU-seconds on it, inside Tune's result loop.
    Here a result is one `log_batch`: the same metrics, at the same steps, in one transaction."""

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]):
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if getattr(self, "_batch_client", None) is None:
            self._batch_client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        timestamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), timestamp, int(tracked["training_iteration"]))
                   for tracked in tracked_metrics(result) for key, value in tracked.items()]
        if metrics:
            self._batch_client.log_batch(self._trial_runs[trial], metrics=metrics)


def _tracked(callback_class: type) -> type:
    """`callback_class` fed through `tracked_metrics` (made here so that importing this module does not load Ray)."""
    return type(f"Tracked{callback_class.__name__}", (_TrackedMetricsOnly, callback_class), {"__module__": __name__})


def mlflow_tracking_uri(experiment_dir: str) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    local = experiment_dir if "://" not in experiment_dir else os.path.basename(experiment_dir.rstrip("/"))
    os.makedirs(local, exist_ok=True)
    return f"sqlite:///{os.path.abspath(local)}/mlflow.db"


def check_trackers_installed(names: list[str]) -> None:
    """Before anything runs: each `--log` name is known and its package installed (ConfigError, exit 2, if not)."""
    packages = {"mlflow": ("mlflow", "mlflow-skinny"), "tensorboard": ("tensorboardX", "tensorboardX"),
                "wandb": ("wandb", "wandb")}
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--log {name}: unknown tracker; allowed: {', '.join(TRACKERS)}")
        module, package = packages[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--log {name}: the {module} package is not installed; pip install {package}")


def tracker_callbacks(names: list[str], experiment_dir: str, experiment: str, sweep: str, log) -> list:
    """The Ray logger callbacks for `--log` names (see `check_trackers_installed`)."""
    check_trackers_installed(names)
    callbacks = []
    for name in dict.fromkeys(names):
        if name == "mlflow":
            uri = mlflow_tracking_uri(experiment_dir)
            log(f"mlflow: experiment {experiment} at {uri}")
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            mlflow_callback = type("TrackedMLflowLoggerCallback", (_OneMlflowBatchPerResult, MLflowLoggerCallback),
                                   {"__module__": __name__})
            callbacks.append(mlflow_callback(tracking_uri=uri, experiment_name=experiment,
                                             tags={"tune_lfm_sweep": sweep}))
        elif name == "tensorboard":
            log(f"tensorboard: event files in each trial's directory; tensorboard --logdir {experiment_dir}")
            from ray.tune.logger import TBXLoggerCallback

            callbacks.append(_tracked(TBXLoggerCallback)())
        else:
            mode = os.environ.get("WANDB_MODE", "online")
            log(f"wandb: project {sweep}, group {experiment} (WANDB_MODE={mode})")
            from ray.air.integrations.wandb import WandbLoggerCallback

            callbacks.append(_tracked(WandbLoggerCallback)(project=sweep, group=experiment))
    return callbacks
