"""Read trial tables (experiment directories, trials.parquet files, CSVs) into one checked dataframe.

Every problem is reported with the path it came from, because users point this at directories written by long
sweeps and need to know which file to look at. A location given as a URI (`s3://`, `gs://`, `file://`, `hdfs://`:
the shared storage of a cluster sweep) is read through pyarrow's filesystems, each file in one read, because the
sweep may be replacing it meanwhile.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from ..results import filesystem, read_parquet
from .formatting import is_missing
from .schema import COMPLETED, HISTORY_COLUMNS, NUMERIC_COLUMNS, REQUIRED_COLUMNS, AnalysisError

TRIALS_FILE = "trials.parquet"
HISTORY_FILE = "history.parquet"
ACCEPTED = ("an experiment directory (holding trials.parquet), a .parquet file or a .csv file, "
            "as a local path or a URI such as s3://bucket/prefix")

Location = Path | str
"""A local path, or a URI (a str holding "://") read through pyarrow's filesystems."""


def is_uri(given: str | Path) -> bool:
    """A Path cannot hold a URI (it folds "//"), so only strings are checked."""
    return isinstance(given, str) and "://" in given


def _parts(where: Location) -> PurePath:
    """Name, stem and suffix of a location; a URI's path splits on "/" like a POSIX path."""
    return where if isinstance(where, Path) else PurePosixPath(where)


def _child(where: Location, name: str) -> Location:
    return where / name if isinstance(where, Path) else f"{where.rstrip('/')}/{name}"


def _sibling(where: Location, name: str) -> Location:
    return where.parent / name if isinstance(where, Path) else f"{where.rsplit('/', 1)[0]}/{name}"


@contextmanager
def _reaching(where: Location) -> Iterator[None]:
    """Missing credentials, an unknown scheme or an unreachable bucket: name the location and what went wrong."""
    try:
        yield
    except (OSError, pa.ArrowException) as err:
        raise AnalysisError(f"{where}: cannot be accessed: {err}") from None


def _kind(where: Location) -> pafs.FileType:
    with _reaching(where):
        fs, path = filesystem(str(where))
        return fs.get_file_info(path).type


def _names_in(directory: Location) -> list[str]:
    with _reaching(directory):
        fs, path = filesystem(str(directory))
        return sorted(PurePosixPath(info.path).name for info in fs.get_file_info(pafs.FileSelector(path)))


@dataclass
class TrialData:
    """All trials of the inputs (one row each, with a `source` column) and their step history, if any was saved."""

    trials: pd.DataFrame
    history: pd.DataFrame | None
    sources: list[str]
    notes: list[str] = field(default_factory=list)
    """Things the report should mention that did not stop the analysis (e.g. an unreadable history file)."""


def _load_parquet(where: Location) -> pd.DataFrame:
    frame = read_parquet(str(where))  # one read: a running sweep may be replacing the file
    if frame is None:
        raise FileNotFoundError("it was removed after it was found")
    return frame


def _load_csv(where: Location) -> pd.DataFrame:
    fs, path = filesystem(str(where))
    with fs.open_input_stream(path) as stream:
        return pd.read_csv(io.BytesIO(stream.read()))


def _read_table(where: Location) -> pd.DataFrame:
    csv = _parts(where).suffix == ".csv"
    try:
        return _load_csv(where) if csv else _load_parquet(where)
    except pd.errors.EmptyDataError:
        raise AnalysisError(f"{where}: the file is empty; expected a header row and one row per trial") from None
    except (OSError, ValueError) as err:
        raise AnalysisError(f"{where}: cannot be read as {'CSV' if csv else 'parquet'}: {err}") from None


def _locate(where: Location) -> tuple[Location, Location | None]:
    """The trials file behind a user-given location, and the history file saved beside it (if any)."""
    kind, suffix = _kind(where), _parts(where).suffix
    if kind == pafs.FileType.NotFound:
        raise AnalysisError(f"{where}: no such file or directory; give {ACCEPTED}")
    if kind == pafs.FileType.Directory:
        trials = _child(where, TRIALS_FILE)
        if _kind(trials) != pafs.FileType.File:
            found = ", ".join(_names_in(where)[:10]) or "nothing"
            raise AnalysisError(f"{where}: not an experiment directory: it has no {TRIALS_FILE} (it holds: {found})")
    elif suffix in (".parquet", ".csv"):
        trials = where
    else:
        raise AnalysisError(f"{where}: unsupported input {suffix or '(no suffix)'}; give {ACCEPTED}")
    history = _sibling(trials, HISTORY_FILE)
    return trials, history if history != trials and _kind(history) == pafs.FileType.File else None


def _source_label(given: Location, trials: Location) -> str:
    """A directory is named by itself, a file by its stem."""
    return _parts(given).name if trials != given else _parts(given).stem


def _check_numeric(frame: pd.DataFrame, where: Location) -> pd.DataFrame:
    frame = frame.copy()
    for column in NUMERIC_COLUMNS:
        if column not in frame:
            continue
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = numbers.isna() & frame[column].notna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            value = frame[column].iloc[row]
            raise AnalysisError(f"{where}: column {column} must hold numbers; row {row} has {value!r}")
        frame[column] = numbers.astype(float)
    return frame


def normalise_trials(frame: pd.DataFrame, where: Location, label: str) -> pd.DataFrame:
    """Check one input's columns and fill what the analysis may assume: status, sweep, trial_id and source."""
    if frame.empty:
        raise AnalysisError(f"{where}: holds no trials (0 rows)")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame]
    if missing:
        raise AnalysisError(f"{where}: missing column(s) {', '.join(missing)}; a trials table needs "
                            f"{', '.join(REQUIRED_COLUMNS)} (it has: {', '.join(map(str, frame.columns))})")
    frame = _check_numeric(frame, where)
    # Tables without a status column (the published study) list finished trials only.
    frame["status"] = frame["status"].fillna("unknown").astype(str) if "status" in frame else COMPLETED
    frame["sweep"] = frame["sweep"].fillna(label).astype(str) if "sweep" in frame else label
    given = frame["trial_id"] if "trial_id" in frame else [None] * len(frame)
    frame["trial_id"] = [f"{label}-{i}" if is_missing(t) else str(t) for i, t in enumerate(given)]
    frame["source"] = str(where)
    return frame


def _read_history(path: Location, notes: list[str]) -> pd.DataFrame | None:
    try:
        history = _load_parquet(path)
    except (OSError, ValueError) as err:
        notes.append(f"{path}: not used for loss curves, it cannot be read: {err}")
        return None
    missing = [c for c in HISTORY_COLUMNS if c not in history]
    if missing:
        notes.append(f"{path}: not used for loss curves, it lacks column(s) {', '.join(missing)}")
        return None
    history = history.copy()
    history["trial_id"] = history["trial_id"].astype(str)
    return history


def load_trials(paths: Sequence[str | Path]) -> TrialData:
    """Read and combine the inputs (local paths or URIs); raise AnalysisError naming the path on anything unusable."""
    if not paths:
        raise AnalysisError(f"no input given; give {ACCEPTED}")
    frames, histories, sources, notes = [], [], [], []
    for given in (p if is_uri(p) else Path(p) for p in paths):
        trials_path, history_path = _locate(given)
        frames.append(normalise_trials(_read_table(trials_path), trials_path, _source_label(given, trials_path)))
        sources.append(str(trials_path))
        if history_path is not None:
            history = _read_history(history_path, notes)
            if history is not None:
                histories.append(history)
    trials = pd.concat(frames, ignore_index=True)
    repeated = trials["trial_id"][trials["trial_id"].duplicated()]
    if not repeated.empty:
        trial_id = repeated.iloc[0]
        where = sorted(set(trials.loc[trials["trial_id"] == trial_id, "source"]))
        raise AnalysisError(f"trial_id {trial_id!r} appears more than once (in {', '.join(where)}); "
                            "was the same experiment given twice?")
    history = pd.concat(histories, ignore_index=True) if histories else None
    return TrialData(trials=trials, history=history, sources=sources, notes=notes)


def expand_sweeps(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (trial, sweep it belongs to). A composed experiment (the study) runs a configuration shared by
    several sweeps once and lists them in `sweeps` ("datasets,rank,..."); each sweep's table and front needs it."""
    if "sweeps" not in trials:
        return trials
    names = [[s.strip() for s in str(listed).split(",") if s.strip()] if not is_missing(listed) else [sweep]
             for listed, sweep in zip(trials["sweeps"], trials["sweep"])]
    expanded = trials.assign(sweep=names).explode("sweep", ignore_index=True)
    return expanded.astype({"sweep": str})


def split_completed(trials: pd.DataFrame, sources: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials that count (completed with a train_loss) and the rest, which the report lists with their status."""
    counts = trials["status"] == COMPLETED
    done = trials[counts & trials["train_loss"].notna()].reset_index(drop=True)
    others = trials[~(counts & trials["train_loss"].notna())].reset_index(drop=True)
    if done.empty:
        statuses = ", ".join(f"{status} {n}" for status, n in trials["status"].value_counts().items())
        errors = trials["error"].dropna().astype(str) if "error" in trials else pd.Series(dtype=str)
        first = f"; first error: {errors.iloc[0][:300]}" if not errors.empty else ""
        raise AnalysisError(f"none of the {len(trials)} trials in {', '.join(sources)} completed with a train_loss "
                            f"(statuses: {statuses}){first}; nothing to analyse")
    return done, others
