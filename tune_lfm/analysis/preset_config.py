"""A trial row turned back into the configuration it ran: every TrialConfig field that differs from its default.

trials.parquet stores the resolved configuration of each trial (what the scale changed included: model, data_source,
grad_accum, max_length, eval_examples, num_examples, max_steps, learning_rate as run, hub_layers), with nested values
as JSON text. Reading them back, checking them with the trial's own validator (`tune_lfm.config.config_from_dict`)
and writing the ones that differ from the defaults gives a YAML that `python -m tune_lfm.trial --config FILE` runs as
that trial ran. The key settings (CONFIG_COLUMNS) are written even when they equal the default, so a preset reads on
its own.

An empty cell means None for a field that may be None (num_examples: one pass worth of rows) when the row is a full
trial record (it has the execution fields only tune_lfm writes, `FULL_RECORD`); in a table that lists only some
settings (the published study) an empty cell is unknown and the default stands, and a missing model is the study's.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

import pandas as pd

from ..config import FIELD_NAMES, FIELD_TYPES, ConfigError, TrialConfig, config_from_dict
from .formatting import is_missing
from .schema import CONFIG_COLUMNS, DEFAULT_MODEL, AnalysisError

DEFAULTS = TrialConfig().to_dict()
FULL_RECORD = ("grad_accum", "max_length", "eval_examples")


def _accepts(field: str, kind: type) -> bool:
    annotation = FIELD_TYPES[field]
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return any((typing.get_origin(option) or option) is kind for option in options)


def _plain(field: str, value: Any) -> Any:
    """A cell as the YAML value the field takes: JSON text back to lists/mappings, whole floats to ints."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, str) and value.lstrip().startswith(("{", "[")) and \
            (_accepts(field, list) or _accepts(field, dict)):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, float) and value.is_integer() and _accepts(field, int) and not _accepts(field, float):
        return int(value)
    return value


def trial_config(trial: pd.Series) -> dict[str, Any]:
    """The trial's resolved configuration as YAML values: key settings always, other fields where not default."""
    full = all(field in trial.index for field in FULL_RECORD)
    values = {field: None if is_missing(trial[field]) else _plain(field, trial[field]) for field in FIELD_NAMES
              if field in trial.index and (not is_missing(trial[field]) or (full and _accepts(field, type(None))))}
    values.setdefault("model", DEFAULT_MODEL)
    try:
        config = config_from_dict(values, where=f"trial {trial.get('trial_id')}").to_dict()
    except ConfigError as err:
        raise AnalysisError(f"{trial.get('source', 'input')}: cannot turn a trial back into a configuration: {err}") \
            from None
    keys = [k for k in CONFIG_COLUMNS if k in values]
    keys += [k for k in FIELD_NAMES if k not in keys and k in values and config[k] != DEFAULTS[k]]
    return {key: config[key] for key in keys}
