"""Turn a :class:`DatasetSpec` into training and held-out conversations, from embedded rows, the hub or a local file.

Which rows a trial gets (the same rule for every source):

- **Held-out rows** are a fixed block that depends on neither ``num_train`` nor ``seed``, so eval losses compare across
  trials: the embedded file's last :data:`EMBEDDED_EVAL_ROWS` rows; on the hub the first ``num_eval`` valid rows of
  ``eval_split``, or, when the dataset has no eval split (and for local files), the first ``num_eval`` valid rows of
  the file/split, with training rows drawn only from what follows them.
- **Training rows** are ``num_train`` conversations drawn with ``seed`` from the next ``num_train +``
  :data:`SAMPLE_POOL_EXTRA` valid rows, so a seed picks a different subset while streaming only a bounded prefix.
- A source with fewer valid rows than asked gives what it has (the embedded train pool is about 100 rows): the
  shortfall is logged and visible as ``len(data.train)``; nothing is repeated.
- Malformed rows (see :mod:`tune_lfm.data.sources`) and unparseable jsonl lines are skipped and counted per reason.

Hub subsets are cached as jsonl under ``cache_dir`` (default ``$TUNE_LFM_CACHE/datasets``, else
``~/.cache/tune_lfm/datasets``), keyed by everything that decides their content, so a repeated trial reads the cache
and never touches the network. Local files are read directly each time.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tune_lfm.cache import cache_folder, key_digest, write_atomically
from tune_lfm.data.registry import DATASETS, LOCAL_SUFFIXES, DatasetSpec, resolve_dataset
from tune_lfm.data.sources import SOURCE_FORMATS, MalformedRow

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_EVAL_ROWS = 20
SAMPLE_POOL_EXTRA = 1000
CACHE_VERSION = 1  # bump when the row-selection rule or the adapters change what a cached subset holds
PARQUET_BATCH_ROWS = 256


class DatasetUnavailable(RuntimeError):
    """The hub could not be reached or read for a dataset."""


@dataclass
class LoadedData:
    """Prepared conversations of one dataset and what it took to get them.

    Attributes:
        train: training conversations, each a list of ``{"role", "content"}`` messages.
        eval: held-out conversations of the same dataset.
        rows_seen: source rows read (valid and malformed) to produce ``train`` and ``eval``.
        rows_skipped: malformed rows among them.
        skip_reasons: count of skipped rows per reason.
        source: ``"embedded"``, ``"hub:<hub id>"`` or ``"path:<file>"``.
    """

    train: list[list[dict]]
    eval: list[list[dict]]
    rows_seen: int
    rows_skipped: int
    skip_reasons: dict[str, int]
    source: str


@dataclass
class _Tally:
    seen: int = 0
    reasons: Counter = field(default_factory=Counter)


def _conversations(rows: Iterable, source_format: str, tally: _Tally) -> Iterator[list[dict]]:
    """Adapt rows lazily; a row may already be a MalformedRow (an unparseable line), which is counted like others."""
    adapter = SOURCE_FORMATS[source_format]
    for row in rows:
        tally.seen += 1
        try:
            if isinstance(row, MalformedRow):
                raise row
            yield adapter(row)
        except MalformedRow as reason:
            tally.reasons[str(reason)] += 1


def _select(spec: DatasetSpec, train_rows: Iterable, eval_rows: Iterable | None, num_train: int, num_eval: int,
            seed: int, source: str) -> LoadedData:
    tally = _Tally()
    train_stream = _conversations(train_rows, spec.source_format, tally)
    eval_stream = train_stream if eval_rows is None else _conversations(eval_rows, spec.source_format, tally)
    held_out = list(itertools.islice(eval_stream, num_eval))
    candidates = list(itertools.islice(train_stream, num_train + SAMPLE_POOL_EXTRA))
    random.Random(seed).shuffle(candidates)
    train = candidates[:num_train]
    for part, got, wanted in (("training", len(train), num_train), ("held-out", len(held_out), num_eval)):
        if got < wanted:
            logger.warning("dataset %s (%s): asked for %d %s conversations, the source has %d",
                           spec.name, source, wanted, part, got)
    return LoadedData(train=train, eval=held_out, rows_seen=tally.seen, rows_skipped=sum(tally.reasons.values()),
                      skip_reasons=dict(tally.reasons), source=source)


def _jsonl_rows(path: Path) -> Iterator[dict | MalformedRow]:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield MalformedRow("invalid JSON line")


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        yield from batch.to_pylist()


def _embedded_rows(spec: DatasetSpec) -> list:
    if spec.embedded is None:
        raise ValueError(f"dataset '{spec.name}' has no embedded rows (only the study datasets ship them: "
                         f"{', '.join(DATASETS)}); load it from its hub id or local path instead of --scale tiny")
    path = EMBEDDED_DIR / spec.embedded
    if not path.is_file():
        raise FileNotFoundError(f"embedded rows of dataset '{spec.name}' not found at {path}")
    return list(_jsonl_rows(path))


def embedded_conversations(name: str, part: str) -> list[list[dict]]:
    """Valid conversations of a study dataset's embedded ``"train"`` pool or held-out ``"eval"`` tail, in file order."""
    parts = {"train": slice(None, -EMBEDDED_EVAL_ROWS), "eval": slice(-EMBEDDED_EVAL_ROWS, None)}
    if part not in parts:
        raise ValueError(f"part must be one of {list(parts)}, got {part!r}")
    spec = resolve_dataset(name)
    return list(_conversations(_embedded_rows(spec)[parts[part]], spec.source_format, _Tally()))


def _local_rows(spec: DatasetSpec) -> Iterator[dict | MalformedRow]:
    path = Path(spec.path)
    if path.suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"dataset '{spec.name}': local path {path} must end with one of {list(LOCAL_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"dataset '{spec.name}': local file {path} does not exist")
    return _jsonl_rows(path) if path.suffix == ".jsonl" else _parquet_rows(path)


def _load_local(spec: DatasetSpec, num_train: int, num_eval: int, seed: int) -> LoadedData:
    return _select(spec, _local_rows(spec), None, num_train, num_eval, seed, f"path:{spec.path}")


def check_local_rows(spec: DatasetSpec, needed: int) -> None:
    """Fail unless the local file of ``spec`` exists and holds ``needed`` rows that become valid conversations.

    Reads only until it has found them (a cheap check before a sweep starts, not a second load).
    """
    tally = _Tally()
    found = sum(1 for _ in itertools.islice(_conversations(_local_rows(spec), spec.source_format, tally), needed))
    if found < needed:
        reasons = ", ".join(f"{count} {reason}" for reason, count in tally.reasons.most_common(3)) or "no rows"
        raise ValueError(f"dataset '{spec.name}': {spec.path} has {found} usable row(s) in format "
                         f"'{spec.source_format}' ({reasons}); a trial holds out the first {needed - 1} and needs at "
                         "least one more to train on")


def _cache_file(spec: DatasetSpec, num_train: int, num_eval: int, seed: int, cache_dir: str | None) -> Path:
    key = {"version": CACHE_VERSION, "hub_id": spec.hub_id, "config": spec.hub_config, "split": spec.split,
           "eval_split": spec.eval_split, "revision": spec.revision, "format": spec.source_format,
           "num_train": num_train, "num_eval": num_eval, "seed": seed}
    return Path(cache_dir or cache_folder("datasets")) / f"{spec.name}-{key_digest(key)}.jsonl"


def _write_cache(path: Path, data: LoadedData) -> None:
    """Header line with the counts, then one ``{"part", "messages"}`` line per conversation; written atomically."""
    header = {key: value for key, value in vars(data).items() if key not in ("train", "eval")}

    def write(partial: Path) -> None:
        with partial.open("w", encoding="utf-8") as out:
            out.write(json.dumps(header) + "\n")
            for part in ("train", "eval"):
                for messages in getattr(data, part):
                    out.write(json.dumps({"part": part, "messages": messages}, ensure_ascii=False) + "\n")

    write_atomically(path, write)


def _read_cache(path: Path) -> LoadedData:
    with path.open(encoding="utf-8") as lines:
        header = json.loads(next(lines))
        parts: dict[str, list] = {"train": [], "eval": []}
        for line in lines:
            record = json.loads(line)
            parts[record["part"]].append(record["messages"])
    return LoadedData(**parts, **header)


@contextmanager
def _hub_errors(spec: DatasetSpec):
    try:
        yield
    except Exception as err:
        raise DatasetUnavailable(
            f"could not stream dataset '{spec.name}' from the hub (hub id '{spec.hub_id}', config {spec.hub_config!r},"
            f" revision {spec.revision!r}): {type(err).__name__}: {err}. Offline, run with `--scale tiny` (embedded"
            f" rows) or point the dataset at a local copy in the config:"
            f" user_datasets: {{{spec.name}: {{path: FILE.jsonl}}}}"
        ) from err


def _load_hub(spec: DatasetSpec, num_train: int, num_eval: int, seed: int, cache_dir: str | None) -> LoadedData:
    cache_file = _cache_file(spec, num_train, num_eval, seed, cache_dir)
    if cache_file.is_file():
        logger.info("dataset %s: reading cached subset %s", spec.name, cache_file)
        return _read_cache(cache_file)
    import datasets

    with _hub_errors(spec):
        streams = datasets.load_dataset(spec.hub_id, spec.hub_config, revision=spec.revision, streaming=True)
    wanted = [spec.split] + ([spec.eval_split] if spec.eval_split else [])
    missing = [split for split in wanted if split not in streams]
    if missing:
        raise ValueError(f"dataset '{spec.name}' (hub id '{spec.hub_id}') has no split(s) {missing}; "
                         f"available: {sorted(streams)}")
    eval_rows = streams[spec.eval_split] if spec.eval_split else None
    with _hub_errors(spec):
        data = _select(spec, streams[spec.split], eval_rows, num_train, num_eval, seed, f"hub:{spec.hub_id}")
    _write_cache(cache_file, data)
    return data


def load_dataset_split(spec: DatasetSpec, num_train: int, num_eval: int, *, embedded: bool, seed: int = 0,
                       cache_dir: str | None = None) -> LoadedData:
    """Training and held-out conversations of ``spec`` (row selection rules in the module docstring).

    ``embedded=True`` reads the rows shipped in the package (offline, tiny scale); otherwise a local ``path`` wins
    over ``hub_id``.
    """
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train and num_eval must be >= 0, got {num_train} and {num_eval}")
    if embedded:
        rows = _embedded_rows(spec)
        logger.info("dataset %s: using the embedded rows %s", spec.name, spec.embedded)
        return _select(spec, rows[:-EMBEDDED_EVAL_ROWS], rows[-EMBEDDED_EVAL_ROWS:], num_train, num_eval, seed,
                       "embedded")
    if spec.path:
        return _load_local(spec, num_train, num_eval, seed)
    if spec.hub_id:
        return _load_hub(spec, num_train, num_eval, seed, cache_dir)
    raise ValueError(f"dataset '{spec.name}' has neither a local path nor a hub id")
