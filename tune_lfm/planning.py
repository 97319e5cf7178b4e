"""A sweep file -> the trials to run, without Ray: validated, scaled, hub layers resolved, identical trials merged.

`make_plan` is everything `python -m tune_lfm.search` knows before it starts Ray, and all `--dry-run` prints. An
Optuna search has no trial list (it samples as results arrive); its plan holds the checked space only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .spaces import PlannedTrial, Sweep, scale_metadata
from .targets import needs_hub_layers, parse_spec, targets_for_model
from .validate import check_sweep

SCALES = ("auto", "tiny", "full")


@dataclass
class Plan:
    sweep: Sweep
    scale: str
    overrides: dict[str, Any]
    trials: list[PlannedTrial] | None
    """Distinct trials in plan order; None for an Optuna search."""

    @property
    def total(self) -> int:
        return len(self.trials) if self.trials is not None else self.sweep.search.num_samples

    def describe(self, as_json: bool = False) -> str:
        if self.trials is None:
            s = self.sweep.search
            return (f"{self.sweep.name}: optuna ({s.sampler}) search, {s.num_samples} trials over "
                    f"{', '.join(self.sweep.dimensions)}; objectives {s.objectives}; scale {self.scale}")
        return describe_trials(self.trials, as_json, self.scale)


def resolve_scale(requested: str, cluster_gpus: float) -> str:
    """auto: full where the cluster has GPUs, tiny where it has none."""
    if requested != "auto":
        return requested
    return "full" if cluster_gpus > 0 else "tiny"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs, each checked on its own as a trial setting."""
    from .config import config_from_dict, parse_set_pairs

    overrides = parse_set_pairs(pairs)
    # each value on its own (the divisibility of micro_batch_size is checked with the rest of each trial's config)
    config_from_dict({k: v for k, v in overrides.items() if k != "micro_batch_size"}, where="--set")
    return overrides


def make_plan(sweep: Sweep, scale: str, overrides: dict[str, Any]) -> Plan:
    """Check every trial (or, for Optuna, every value of the space) and resolve the trials to run."""
    planned = check_sweep(sweep, scale, overrides)
    return Plan(sweep, scale, overrides, with_hub_layers(planned) if planned is not None else None)


def with_hub_layers(trials: list[PlannedTrial]) -> list[PlannedTrial]:
    """Each model's hub layers resolved once and written into every trial that uses them; trials that became
    identical (hub layers spelled out in one, resolved in the other) are then merged, so each runs once."""
    from .atlas import resolve_hub_layers

    hubs: dict[str, list[int]] = {}
    merged: dict[str, PlannedTrial] = {}
    for trial in trials:
        config = trial.config
        if config.hub_layers is None and needs_hub_layers(parse_spec(config.lora_targets)):
            if config.model not in hubs:
                hubs[config.model] = resolve_hub_layers(config.model, None)
            trial = PlannedTrial(config.replace(hub_layers=hubs[config.model]), trial.sweeps)
        if trial.trial_id in merged:
            same = merged[trial.trial_id]
            same.sweeps.extend(name for name in trial.sweeps if name not in same.sweeps)
        else:
            merged[trial.trial_id] = PlannedTrial(trial.config, list(trial.sweeps))
    return list(merged.values())


def adapter_sizes(trials: list[PlannedTrial]) -> dict[str, int]:
    """Trainable parameters per trial id, computed on the meta device (no weights), each distinct shape once."""
    cache: dict[tuple, int] = {}
    sizes = {}
    for trial in trials:
        c = trial.config
        key = (c.model, c.targets_label(), c.lora_rank, tuple(c.hub_layers or ()))
        if key not in cache:
            cache[key] = targets_for_model(c.model, c.lora_targets, c.hub_layers).trainable_params(c.lora_rank)
        sizes[trial.trial_id] = cache[key]
    return sizes


def longest_first(trials: list[PlannedTrial]) -> list[PlannedTrial]:
    """Trials in the order to start them: most conversations to train first, so a long trial (the duration sweep's
    1000 steps) does not start last and run alone at the end while the other slots sit idle. Ties keep plan order."""
    return sorted(trials, key=lambda t: -t.config.max_steps * t.config.effective_batch)


def heaviest(trials: list[PlannedTrial]):
    """The config whose micro-batch needs the most memory: the one the GPU share is measured on."""
    sizes = adapter_sizes(trials)
    return max(trials, key=lambda t: ((t.config.micro_batch_size or t.config.batch_size) * t.config.max_length,
                                      sizes[t.trial_id])).config


def describe_trials(trials: list[PlannedTrial], as_json: bool, scale: str) -> str:
    """The planned trials as JSON or as a table headed by the scale they were resolved at; every sweep a trial
    belongs to is listed, however many."""
    sizes = adapter_sizes(trials)
    rows = [{"trial_id": t.trial_id, "sweeps": t.sweeps, "trainable_params": sizes[t.trial_id], **t.config.to_dict()}
            for t in trials]
    if as_json:
        return json.dumps(rows, indent=2, default=str)
    sweeps = max([len("sweeps")] + [len(",".join(row["sweeps"])) for row in rows])
    header = f"{'trial_id':12}  {'sweeps':{sweeps}} {'model':22} {'dataset':18} {'optim':19} {'lr':>8} {'r':>3} " \
             f"{'targets':11} {'steps':>5} {'rows':>5} {'params':>9}"
    lines = [f"scale: {scale.upper()} ({scale_metadata(scale)['scale_rule']})", header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['trial_id']:12}  {','.join(row['sweeps']):{sweeps}} {row['model'][:22]:22} "
                     f"{row['dataset'][:18]:18} {row['optimizer']:19} {row['learning_rate']:>8.1e} "
                     f"{row['lora_rank']:>3} {str(row['lora_targets'])[:11]:11} {row['max_steps']:>5} "
                     f"{str(row['num_examples']):>5} {row['trainable_params']:>9,}")
    lines.append(f"{len(rows)} trials")
    return "\n".join(lines)
