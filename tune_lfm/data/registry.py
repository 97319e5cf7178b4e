"""The study's ten datasets, and user datasets declared in YAML, as :class:`DatasetSpec` values.

A user entry is ``{name: {hub_id | path, format, config?, split?, eval_split?, revision?}}``. An entry whose name is a
study dataset overrides that dataset's fields (e.g. ``gsm8k: {path: /data/gsm8k.parquet}`` to read a local copy) and
inherits its format; a new name must give ``format`` and one of ``hub_id`` / ``path``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tune_lfm.data.sources import SOURCE_FORMATS

LOCAL_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and which source schema its rows follow.

    Attributes:
        name: registry name (the ``--dataset`` value).
        source_format: key of ``SOURCE_FORMATS`` that turns a row into chat messages.
        hub_id: Hugging Face dataset repository, read with streaming.
        hub_config: dataset config (subset) name on the hub, if the repository has several.
        split: split the training rows come from.
        eval_split: split the held-out rows come from; ``None`` holds out the first rows of ``split`` instead.
        path: local ``.jsonl`` or ``.parquet`` file; when set it is read instead of the hub.
        revision: hub git revision (branch, tag or commit).
        embedded: file name in ``tune_lfm/data/embedded`` with rows in the source schema, for offline runs.
    """

    name: str
    source_format: str
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "train"
    eval_split: str | None = None
    path: str | None = None
    revision: str | None = None
    embedded: str | None = None


def _study(name: str, source_format: str, hub_id: str, **fields) -> DatasetSpec:
    return DatasetSpec(name=name, source_format=source_format, hub_id=hub_id, embedded=f"{name}.jsonl", **fields)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _study("smol-magpie-ultra", "messages", "HuggingFaceTB/smoltalk", hub_config="smol-magpie-ultra",
               eval_split="test"),
        _study("ultrachat", "messages", "HuggingFaceH4/ultrachat_200k", split="train_sft", eval_split="test_sft"),
        _study("finetome", "sharegpt", "mlabonne/FineTome-100k"),
        _study("magicoder", "magicoder", "ise-uiuc/Magicoder-OSS-Instruct-75K"),
        _study("tulu3", "messages", "allenai/tulu-3-sft-mixture"),
        # OpenHermes-2.5 is a single ~1M-row JSON *array* file on its main branch. The `datasets` JSON builder reads
        # an array file whole even when streaming (it must parse it to split it into rows), so the first rows would
        # cost the full ~1.9 GB download. The hub's dataset viewer publishes a parquet conversion of every public
        # dataset on the `refs/convert/parquet` branch (files `default/train/NNNN.parquet`); streaming parquet reads
        # the footer and then one row group at a time, so taking the first rows downloads only a few MB.
        _study("openhermes", "sharegpt", "teknium/OpenHermes-2.5", hub_config="default",
               revision="refs/convert/parquet"),
        _study("slimorca", "sharegpt", "Open-Orca/SlimOrca"),
        _study("gsm8k", "gsm8k", "openai/gsm8k", hub_config="main", eval_split="test"),
        _study("dolly", "dolly", "databricks/databricks-dolly-15k"),
        _study("alpaca", "alpaca", "tatsu-lab/alpaca"),
    )
}

_USER_KEYS = {
    "hub_id": "hub_id",
    "path": "path",
    "format": "source_format",
    "config": "hub_config",
    "split": "split",
    "eval_split": "eval_split",
    "revision": "revision",
}


def _user_fields(name: str, entry: object) -> dict:
    where = f"user dataset '{name}'"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with keys {sorted(_USER_KEYS)}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_USER_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(_USER_KEYS)}")
    for key, value in entry.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    if "format" in entry and entry["format"] not in SOURCE_FORMATS:
        raise ValueError(f"{where}: unknown format '{entry['format']}'; allowed formats: {sorted(SOURCE_FORMATS)}")
    if "hub_id" in entry and "path" in entry:
        raise ValueError(f"{where}: give either 'hub_id' or 'path', not both")
    if "path" in entry and not entry["path"].endswith(LOCAL_SUFFIXES):
        raise ValueError(f"{where}: path '{entry['path']}' must end with one of {list(LOCAL_SUFFIXES)}")
    return {_USER_KEYS[key]: value for key, value in entry.items()}


def _user_spec(name: str, entry: object) -> DatasetSpec:
    fields = _user_fields(name, entry)
    if "path" in fields:
        fields["path"] = str(Path(fields["path"]).expanduser())
    if name in DATASETS:
        return replace(DATASETS[name], **fields)
    missing = [] if "source_format" in fields else ["format"]
    if "hub_id" not in fields and "path" not in fields:
        missing.append("hub_id or path")
    if missing:
        raise ValueError(f"user dataset '{name}': missing {', '.join(missing)} (formats: {sorted(SOURCE_FORMATS)})")
    return DatasetSpec(name=name, **fields)


def resolve_dataset(name: str, user_datasets: dict | None = None) -> DatasetSpec:
    """The spec for ``name``: a user entry (validated, overriding a study dataset of that name) or a study dataset."""
    user_datasets = user_datasets or {}
    if name in user_datasets:
        return _user_spec(name, user_datasets[name])
    if name in DATASETS:
        return DATASETS[name]
    known = sorted(DATASETS) + sorted(set(user_datasets) - set(DATASETS))
    raise ValueError(f"unknown dataset '{name}'; known datasets: {', '.join(known)}")
