"""The experiment's dataframes: `trials.parquet` (one row per trial) and `history.parquet` (one row per logged step).

Both are rewritten whole, atomically (a temporary file renamed over the old one; an object PUT on S3/GCS), every time a
trial finishes, so a crash or a concurrent reader never sees half a file and nothing already computed is lost. Each
rewrite merges with what is on storage first, so it never deletes rows it did not write.
Readable by pandas, polars and DuckDB. Column definitions and units are in README.md ("What a trial reports").
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TRIAL_COLUMNS = [
    "trial_id", "sweep", "sweeps", "status", "error", "attempts", "scale", "scale_rule", "lr_multiplier", "model",
    "dataset", "optimizer", "learning_rate", "lora_rank", "lora_alpha", "lora_targets", "hub_layers", "max_steps",
    "num_examples", "seed", "trainable_params", "total_params", "train_loss", "eval_loss", "eval_loss_se",
    "base_loss", "base_loss_se", "improvement", "improvement_se", "eval_rows", "kl", "kl_se", "kl_p95",
    "probe_loss", "probe_loss_se", "probe_base_loss", "probe_base_loss_se", "probe_improvement",
    "probe_improvement_se", "hub_preserved",
    "hub_rank_corr", "hub_topk_jaccard", "tokens_trained", "tokens_per_s", "train_s", "prepare_s", "load_s", "eval_s",
    "wall_s", "peak_mem_gb", "adapter_uri", "adapter_bytes", "resumed_from_step",
    "rows_skipped", "rows_dropped", "train_rows", "steps_completed", "data_source_used", "device", "precision_used",
    "packing_used", "micro_batch_used", "gradient_checkpointing_used", "lm_head_used", "frozen_linear_used",
    "node_id", "hostname", "gpu_name", "started_at", "finished_at",
]
"""Leading columns, always present (NaN/None where not measured); the rest of the flattened config follows."""
HISTORY_COLUMNS = ["trial_id", "step", "loss", "learning_rate", "grad_norm", "tokens_seen", "tokens_per_s", "elapsed_s"]


class StorageError(RuntimeError):
    """The experiment directory cannot be written."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for `uri` (s3://, gs://, file://, ...; a plain path is local) and the path within it."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _cell(value: Any) -> Any:
    """Nested values (lists of layers, dataset declarations, target specs) become JSON text: one type per column."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def trials_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    extra = sorted({key for row in rows for key in row} - set(TRIAL_COLUMNS))
    frame = pd.DataFrame([{k: _cell(row.get(k)) for k in TRIAL_COLUMNS + extra} for row in rows],
                         columns=TRIAL_COLUMNS + extra)
    return frame


def history_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def write_parquet_atomic(frame: pd.DataFrame, uri: str) -> None:
    """Write `frame` to `uri` so that readers see the old file or the new one, never a partial one."""
    fs, path = filesystem(uri)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    parent = path.rsplit("/", 1)[0]
    try:
        fs.create_dir(parent, recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            pq.write_table(table, temporary, filesystem=fs)
            fs.move(temporary, path)
        else:  # object stores replace an object in one PUT
            pq.write_table(table, path, filesystem=fs)
    except OSError as err:
        raise StorageError(f"cannot write {uri}: {err}") from err


def read_parquet(uri: str) -> pd.DataFrame | None:
    """The whole file in one sequential read, then parsed: a reader racing a rewrite gets one version whole.

    Readers that open the file more than once (pyarrow datasets, and so pd.read_parquet(path), polars, DuckDB) can
    pair the footer of one version with the pages of the next while a sweep rewrites it.
    """
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as stream:
        return pq.read_table(pa.BufferReader(stream.read())).to_pandas()


def check_writable(directory: str) -> None:
    """Fail before any trial runs if results could not be saved."""
    fs, path = filesystem(directory)
    probe = f"{path}/.write-test-{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as stream:
            stream.write(b"ok")
        fs.delete_file(probe)
    except OSError as err:
        raise StorageError(f"experiment storage {directory} is not writable: {err}") from err


def experiment_exists(directory: str) -> bool:
    """Whether anything was written under `directory` (a local path or a URI)."""
    fs, path = filesystem(directory)
    try:
        return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    except NotADirectoryError:
        return True
    except OSError as err:
        raise StorageError(f"cannot read {directory}: {err}") from err


class ExperimentRecord:
    """Trial rows and step history of one experiment, kept in memory and flushed atomically after each change.

    Rows already on storage (a resumed experiment) are loaded first and kept; a trial id appears at most once. Each
    flush merges with what storage holds then: rows of trials this record did not write are taken from storage, so
    a second writer's rows are never deleted, only the trials this record ran are replaced.
    """

    def __init__(self, directory: str):
        self.directory = directory.rstrip("/")
        self.trials_uri = f"{self.directory}/trials.parquet"
        self.history_uri = f"{self.directory}/history.parquet"
        existing = read_parquet(self.trials_uri)
        self.rows: dict[str, dict[str, Any]] = (
            {row["trial_id"]: row for row in existing.to_dict("records")} if existing is not None else {}
        )
        history = read_parquet(self.history_uri)
        self.history: list[dict[str, Any]] = history.to_dict("records") if history is not None else []
        self.owned: set[str] = set()
        """Trials whose row and history this record writes; every other trial's come from storage."""

    def finished_ids(self) -> set[str]:
        return {tid for tid, row in self.rows.items() if row.get("status") in ("completed", "diverged")}

    def drop_history(self, trial_id: str, after: int | None = None) -> None:
        """A trial (re)starting begins its history afresh, or after step `after` when it resumes from a checkpoint
        of that step: no step of an interrupted attempt is kept twice."""
        self.owned.add(trial_id)
        self.history = [row for row in self.history
                        if row["trial_id"] != trial_id or (after is not None and row["step"] <= after)]

    def add_step(self, trial_id: str, step: dict[str, Any]) -> None:
        self.owned.add(trial_id)
        self.history.append({"trial_id": trial_id, **{k: step.get(k) for k in HISTORY_COLUMNS[1:]}})

    def set_trial(self, row: dict[str, Any]) -> None:
        self.owned.add(row["trial_id"])
        self.rows[row["trial_id"]] = row
        self.flush()

    def update_trials(self, changes: dict[str, dict[str, Any]]) -> None:
        """Change columns of recorded trials (this record then writes those rows) and flush once."""
        for trial_id, values in changes.items():
            self.owned.add(trial_id)
            self.rows[trial_id] = {**self.rows[trial_id], **values}
        self.flush()

    def _merge_storage(self) -> None:
        stored = read_parquet(self.trials_uri)
        for row in stored.to_dict("records") if stored is not None else []:
            if row["trial_id"] not in self.owned:
                self.rows[row["trial_id"]] = row
        history = read_parquet(self.history_uri)
        if history is not None:
            theirs = [row for row in history.to_dict("records") if row["trial_id"] not in self.owned]
            replaced = {row["trial_id"] for row in theirs}
            self.history = theirs + [row for row in self.history if row["trial_id"] not in replaced]

    def flush(self) -> None:
        """History first: a trial's row on storage says its steps are there too, whenever the driver is stopped (a
        trial whose steps were written but not its row runs again on resume, and its steps are replaced)."""
        self._merge_storage()
        write_parquet_atomic(history_frame(self.history), self.history_uri)
        write_parquet_atomic(trials_frame(list(self.rows.values())), self.trials_uri)
