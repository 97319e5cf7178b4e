"""Datasets: the study's registry, source-schema adapters, loading (embedded, hub, local) and the KL probe set."""

from tune_lfm.data.loading import LoadedData, embedded_conversations, load_dataset_split
from tune_lfm.data.probe import PROBE_VERSION, load_probe, probe_fingerprint
from tune_lfm.data.registry import DATASETS, DatasetSpec, resolve_dataset
from tune_lfm.data.sources import SOURCE_FORMATS, MalformedRow

__all__ = [
    "DATASETS",
    "PROBE_VERSION",
    "SOURCE_FORMATS",
    "DatasetSpec",
    "LoadedData",
    "MalformedRow",
    "embedded_conversations",
    "load_dataset_split",
    "load_probe",
    "probe_fingerprint",
    "resolve_dataset",
]
