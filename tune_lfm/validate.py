"""Everything a trial can know before compute, checked before Ray starts and before any weights or rows are loaded.

A sweep checks each of its distinct trials here, so a wrong dataset name, a missing or empty data file, a model that
cannot be found, a target set the model does not have or a hub layer out of range stops the run with one error naming
the key and what is allowed, instead of failing (and being retried) inside every trial. Models are checked from
their config alone (meta device, no weights); local data files are read only until enough usable rows are seen.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from .config import ConfigError, TrialConfig
from .spaces import PlannedTrial, Sweep, plan_trials, scaled_config


def check_trial(config: TrialConfig, where: str) -> None:
    """Raise ConfigError (or ModelNotFoundError) for anything in `config` that would make the trial fail."""
    _check_scheduler(config.lr_scheduler, where)
    _check_dataset(config.dataset, json.dumps(config.user_datasets, sort_keys=True), config.uses_embedded_data,
                   config.eval_examples, where)
    _check_model_targets(config.model, config.targets_label(), tuple(config.hub_layers or ()) or None, where)


@functools.lru_cache(maxsize=None)
def scheduler_names() -> tuple[str, ...]:
    """The values of transformers' `SchedulerType`, read from the source of `transformers.trainer_utils`: importing
    that module imports peft and accelerate, 2.5 of the 5 CPU-seconds a sweep's driver otherwise spends before Ray."""
    import ast
    import importlib.util

    source = Path(importlib.util.find_spec("transformers.trainer_utils").origin).read_text()
    [enum] = [node for node in ast.parse(source).body
              if isinstance(node, ast.ClassDef) and node.name == "SchedulerType"]
    return tuple(statement.value.value for statement in enum.body
                 if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant))


@functools.lru_cache(maxsize=None)
def _check_scheduler(name: str, where: str) -> None:
    allowed = scheduler_names()
    if name not in allowed:
        raise ConfigError(f"{where}: `lr_scheduler` is {name!r}; allowed: {', '.join(allowed)}")


@functools.lru_cache(maxsize=None)
def _check_dataset(name: str, user_datasets: str, embedded: bool, eval_examples: int, where: str) -> None:
    from .data.loading import check_local_rows
    from .data.registry import resolve_dataset

    try:
        spec = resolve_dataset(name, json.loads(user_datasets))
        if embedded and spec.embedded is None:
            raise ValueError(f"dataset '{name}' has no embedded rows (only the study datasets ship them); give it "
                             "data_source: hub to read its path or hub id")
        if not embedded and spec.path:
            check_local_rows(spec, eval_examples + 1)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{where}: `dataset`: {err}") from None


@functools.lru_cache(maxsize=None)
def _check_model_targets(model: str, targets: str, hub_layers: tuple[int, ...] | None, where: str) -> None:
    """The model's config can be found, and the target set and hub layers exist in it (its layout, no weights)."""
    from .models import model_layout, resolve_model
    from .targets import needs_hub_layers, parse_spec, published_hub_layers, resolve_targets

    layout = model_layout(resolve_model(model))
    layers = len(layout.layers)
    if hub_layers is not None and max(hub_layers) >= layers:
        raise ConfigError(f"{where}: `hub_layers` {list(hub_layers)} out of range: {model} has {layers} decoder "
                          f"layers (0-{layers - 1})")
    specs = parse_spec(targets if not targets.startswith(("{", "[")) else json.loads(targets), where=f"{where}: "
                       "`lora_targets`")
    hubs = list(hub_layers) if hub_layers else published_hub_layers(model)
    if hubs is None and needs_hub_layers(specs):
        hubs = list(range(layers))  # this model's hubs come from its atlas later; any layer may be one
    try:
        resolve_targets(layout, specs, hubs)
    except ConfigError as err:
        raise ConfigError(f"{where}: `lora_targets` {targets}: {err}") from None


def check_sweep(sweep: Sweep, scale: str, overrides: dict[str, Any]) -> list[PlannedTrial] | None:
    """Plan a grid or random sweep and check each distinct trial; for Optuna, check every value each dimension can
    take (categorical values, and the bounds of ranges). Returns the planned trials (None for Optuna)."""
    from .config import config_from_dict

    if sweep.search.algorithm != "optuna":
        planned = plan_trials(sweep, scale, overrides)
        for trial in planned:
            check_trial(trial.config, sweep.source)
        return planned
    base = {**sweep.fixed, **overrides}
    check_trial(scaled_config(config_from_dict(base, where=sweep.source), scale), sweep.source)
    for key, dim in sweep.dimensions.items():
        values = dim.values if dim.kind in ("grid", "choice") else [dim.values[0], dim.values[1]]
        if dim.kind == "randint":
            values = [int(values[0]), int(values[1]) - 1]
        for value in values:
            assignment = value if key == "variants" else {key: value}
            where = f"{sweep.source}: sweep.{key} = {value!r}"
            check_trial(scaled_config(config_from_dict({**base, **assignment, **overrides}, where=where), scale), where)
    return None


def check_output_dir(path: str, flag: str) -> None:
    """`path` is, or can be created as, a writable directory (checked before a trial spends its compute)."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a directory")
    parent = next(p for p in (target, *target.parents) if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, so no directory can be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not writable")
